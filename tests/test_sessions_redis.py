"""tests/test_sessions.py's session semantics again, with the sessions in a real Redis
(--session-store redis://...): positions and GetSession, calls that time out, cancelled glimpse
streams, snapshot/restore/fork across two servers sharing the store, busy and unknown sessions.
Each test is test_sessions.py's own function, run here against these fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis_harness import RedisServer
from server_harness import ServerThread, export_tiny_models
from test_sessions import (  # noqa: F401 - collected here, with this module's fixtures
    LIMITS,
    test_a_cancelled_glimpse_stream_keeps_the_glimpses_answered,
    test_calls_that_time_out_leave_the_session_unchanged,
    test_positions_in_every_response_and_get_session,
    test_snapshot_and_fork_of_a_busy_or_unknown_session,
    test_snapshot_restore_and_fork_continue_bit_identically,
)

from serving.engine import Limits


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return export_tiny_models(tmp_path_factory.mktemp("exported"))


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(models_dir, redis_server):
    s = ServerThread(models_dir, Limits(max_sessions=64, checkpoint_interval=0.3, **LIMITS),
                     session_store=redis_server.url)
    yield s
    s.close()


@pytest.fixture(scope="module")
def replica(models_dir, redis_server):
    """A second server on the same store: sessions and snapshots move between them."""
    s = ServerThread(models_dir, Limits(checkpoint_interval=0.3, **LIMITS), session_store=redis_server.url)
    yield s
    s.close()
