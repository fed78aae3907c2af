"""Shared fixtures: where the real datasets are (they may be absent), torch's thread count (one:
pytest_configure), the tiny exported models the server tests serve, a real Redis, and the Docker
engine and images of the `docker` tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# CI and the development machines keep the datasets in ../shared/data beside the checkout;
# NLSTM_TEST_DATA overrides that. A fresh clone without them skips the tests that need them.
SHARED_DATA = Path(os.environ.get("NLSTM_TEST_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
    """One torch thread in the test process. The tests' models have 8-128 cells: their ops are
    too small to share between threads, and an OpenMP thread that waits for a busy core made a
    12-cell training run 10x slower on the loaded 2-core development machine (136 s against
    13 s, measured when issue 17 was worked on). Subprocesses the tests start set their own."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the tests
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The directory holding the real datasets; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set NLSTM_TEST_DATA)")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """The tiny exported models (training/testing/models.py), exported once per test module."""
    from training.testing.models import export_tiny_models

    return export_tiny_models(tmp_path_factory.mktemp("exported"))


@pytest.fixture(scope="module")
def redis_server():
    """A real redis-server on a free loopback port for one test module (skips without one)."""
    from serving.testing.process import RedisMissing, RedisServer

    try:
        server = RedisServer()
    except RedisMissing as exc:  # .ci/run installs it
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory):
    """The `docker` tests' engine (tests/docker_harness.py): .ci/run's dockerd, or one started
    here; no container the tests ran outlives the session."""
    from docker_harness import start_engine

    engine, dockerd = start_engine(tmp_path_factory.mktemp("dockerd"))
    try:
        yield engine
        # Untagged images stay: with the classic builder they are the build cache (the build
        # and venv stages' layers), and pruning them made every later run rebuild the image
        # (133 s instead of seconds). `docker image prune` on this engine frees what rebuilds of
        # changed sources left behind, at the cost of that cache.
        engine.docker("container", "prune", "-f", check=False)
    finally:
        if dockerd is not None:
            dockerd.stop()


@pytest.fixture(scope="session")
def docker_images(docker_engine):
    """Each image built once per session, by whichever test needs it first."""
    from docker_harness import Images

    return Images(docker_engine)
