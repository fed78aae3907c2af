"""tests/test_sessions.py's and test_sessions_snapshot.py's session semantics again, with the
sessions in a real Redis (--session-store redis://...): positions and GetSession, calls that time
out, cancelled glimpse streams, snapshot/restore/fork across two servers sharing the store, busy
and unknown sessions. Each test is those modules' own function, run here against these
fixtures."""

from __future__ import annotations

import pytest
from sessions_support import LIMITS
from test_sessions import (  # noqa: F401 - collected here, with this module's fixtures
    test_a_cancelled_glimpse_stream_keeps_the_glimpses_answered,
    test_calls_that_time_out_leave_the_session_unchanged,
    test_positions_in_every_response_and_get_session,
)
from test_sessions_snapshot import (  # noqa: F401 - collected here, with this module's fixtures
    test_snapshot_and_fork_of_a_busy_or_unknown_session,
    test_snapshot_restore_and_fork_continue_bit_identically,
)

from serving.engine import Limits
from serving.testing.inprocess import ServerThread
from training.testing.models import GLIMPSE_MODEL


@pytest.fixture(scope="module")
def server(models_dir, redis_server):
    s = ServerThread(
        models_dir,
        Limits(max_sessions=64, checkpoint_interval=0.3, **LIMITS),
        session_store=redis_server.url,
    )
    yield s
    s.close()


@pytest.fixture(scope="module")
def replica(models_dir, redis_server):
    """A second server on the same store: sessions and snapshots move between them."""
    s = ServerThread(
        models_dir, Limits(checkpoint_interval=0.3, **LIMITS), session_store=redis_server.url
    )
    yield s
    s.close()


def test_cancelled_calls_write_their_sessions_at_once(models_dir, redis_server):
    """A client that cancels gets its session released with what was sent, at once, every
    time: the call's last write is not dropped when the cancelled call stops waiting for it
    (which would leave the session as it was, locked until its lease lapsed: 15 s here, with
    no checkpoint during these short calls)."""
    import queue

    from sessions_support import random_glimpses, settled, sid_of

    from serving.api.nlstm.v1 import inference_pb2 as pb

    s = ServerThread(
        models_dir, Limits(checkpoint_interval=5.0, **LIMITS), session_store=redis_server.url
    )
    try:
        stub, glimpses = s.stub, random_glimpses(4, 2)
        for _ in range(20):
            gid = sid_of(stub, GLIMPSE_MODEL)
            requests: queue.Queue = queue.Queue()
            stream = stub.ClassifyGlimpses(iter(requests.get, None))
            for i in range(2):
                requests.put(
                    pb.GlimpseRequest(session_id=gid if i == 0 else "", pixels=glimpses[i].tolist())
                )
                next(stream)
            stream.cancel()
            requests.put(None)
            assert (
                settled(stub, gid, timeout=10).position >= 1
            )  # released by the call, not by expiry
            stub.CloseSession(pb.CloseSessionRequest(session_id=gid))
    finally:
        s.close()
