"""The images built and run for real, on .ci/run's dockerd (NLSTM_DOCKER_HOST) or one these tests
start (tests/docker_harness.py); each image built once per session (conftest.py's fixtures).

- deploy/build-image.sh serve-cpu builds the CPU serving image, on a base built from Debian
  packages by deploy/local-base.sh where no registry is reachable; the build context holds only
  what .dockerignore lets in, no torch is downloaded, setuptools raises no deprecation, and the
  image keeps no wheel in its layers;
- the container, through its published ports: Docker's own HEALTHCHECK turns healthy and the
  gRPC health check says SERVING; a seeded Generate gives what `nlstm serve` outside Docker
  gives; /metrics counts that call; it runs as uid 10001 with a writable home, holds no torch,
  and `docker stop` ends it with exit code 0 well within the grace period;
- the GPU image: built where its CUDA base is at hand (and then its onnxruntime must offer
  CUDA); elsewhere the script and the Dockerfile say what is missing;
- compose: both server replicas, Redis (Debian's redis-server on the local Python base) and a
  real Prometheus (Debian's, where prom/prometheus cannot be pulled): a session created through
  replica 1 is served by replica 2; Prometheus scrapes both, its HTTP API holds their nlstm_
  series after the calls, and its alert rules load.

Marked `docker` (and `slow`): the README's `python -m pytest -q` leaves them out, .ci/run runs
them in its second step (`-m "docker or long"`). Minutes: a first run bootstraps the bases and
builds; later runs reuse both. Skipped without root or Docker, except under CI, where they fail
instead (docker_harness.required).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import grpc
import pytest
import yaml
from docker_harness import REPO, Engine, tail
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.slow, pytest.mark.docker]

TAG = "nlstm:serve-cpu"
GRACE = 10.0  # the image's NLSTM_GRACE
# One seeded request, sent to the container and to `nlstm serve` outside it.
REQUEST = {
    "model": "ptb-nlstm",
    "prompt": "the company said ",
    "max_chars": 80,
    "temperature": 1.0,
    "seed": 16,
}


@pytest.fixture(scope="module")
def engine(docker_engine) -> Engine:
    return docker_engine


@pytest.fixture(scope="module")
def serve_image(docker_images) -> dict:
    build = docker_images.build("serve-cpu")
    return {"log": build.log, "seconds": build.seconds}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, probe, timeout: float, interval: float = 1.0):
    """probe() until it returns something truthy; fail saying what did not happen."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except (OSError, grpc.RpcError, ValueError) as err:
            last = err
        time.sleep(interval)
    raise AssertionError(f"{what} within {timeout:.0f} s (last: {last!r})")


def _health(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _generate(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        replies = list(
            pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(**REQUEST), timeout=60)
        )
    assert replies[-1].finish_reason == pb.FINISH_REASON_LENGTH
    return "".join(r.text for r in replies)


def _metric(text: str, name: str, labels: dict[str, str]) -> float | None:
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
        if m and m.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))) == labels:
            return float(m.group(3))
    return None


def _allowed_context_bytes() -> int:
    """Bytes of the files .dockerignore lets into the build context (its allowlist)."""
    total = 0
    for line in (REPO / ".dockerignore").read_text().splitlines():
        if line.startswith("!"):
            path = REPO / line[1:].rstrip("/")
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            total += sum(f.stat().st_size for f in files if "__pycache__" not in f.parts)
    return total


# ----------------------------------------------------------------------------------- the build
def test_the_cpu_build_is_offline_ready_lean_and_clean(engine, serve_image):
    log = serve_image["log"]
    # the context: what .dockerignore lets in, not .git, .venv or runs/ (the classic builder
    # reports "Sending build context to Docker daemon  23.4MB", BuildKit "transferring context")
    m = re.search(
        r"(?:Sending build context to Docker daemon|transferring context:)"
        r"\s+([\d.]+)\s*([kKMG]i?B)",
        log,
    )
    assert m, tail(log)
    scale = {"kB": 1e3, "KB": 1e3, "KiB": 1024, "MB": 1e6, "MiB": 2**20, "GB": 1e9, "GiB": 2**30}[
        m.group(2)
    ]
    sent = float(m.group(1)) * scale
    assert sent <= 1.1 * _allowed_context_bytes() + 1e6, (
        f"context of {sent / 1e6:.1f} MB: .dockerignore lets in too much"
    )
    # a CPU build never reaches torch or CUDA, on any builder
    assert not re.search(r"(Collecting|Downloading) (torch|nvidia)", log), (
        "the CPU build downloaded torch or CUDA"
    )
    # the SPDX license string: no deprecation from the newest setuptools the wheel build pulls
    assert not re.search(
        r"SetuptoolsDeprecationWarning|License classifiers are deprecated"
        r"|`project.license` as a TOML table",
        log,
    )
    # the wheel and requirements are copied into a discarded stage, not into the image's layers
    history = engine.docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", TAG).stdout
    assert "/tmp/wheels" not in history and "requirements-serve" not in history
    assert (
        engine.docker("run", "--rm", "--entrypoint", "sh", TAG, "-c", "ls -A /tmp").stdout.strip()
        == ""
    )


# ------------------------------------------------------------------------------- the container
@pytest.fixture(scope="module")
def host_server(tmp_path_factory):
    """`nlstm serve` outside Docker, on the same bundled models."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [
        sys.executable,
        "-m",
        "training.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "-1",
        "--models",
        str(REPO / "exported"),
    ]
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait(
            "nlstm serve outside Docker answers SERVING",
            lambda: _health(f"127.0.0.1:{port}") == "SERVING",
            90,
        )
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.communicate(timeout=GRACE + 15)


def test_the_serving_container(engine, serve_image, host_server):
    name = f"nlstm-test-{os.getpid()}"
    engine.docker(
        "run",
        "-d",
        "--name",
        name,
        "-p",
        "127.0.0.1::50051",
        "-p",
        "127.0.0.1::9090",
        "-e",
        "OMP_NUM_THREADS=1",
        TAG,
    )
    try:
        ports = {}
        for inner in ("50051", "9090"):
            host = engine.docker("port", name, f"{inner}/tcp").stdout.split()[0]
            ports[inner] = host.rsplit(":", 1)[1]
        target = f"127.0.0.1:{ports['50051']}"

        def docker_health():
            state = json.loads(engine.docker("inspect", "--format", "{{json .State}}", name).stdout)
            assert state["Running"], (
                engine.docker("logs", name).stdout + engine.docker("logs", name).stderr
            )
            return state.get("Health", {}).get("Status") == "healthy"

        # the image's own HEALTHCHECK (python -m serving.healthcheck inside it), then ours
        _wait("Docker's HEALTHCHECK reports healthy", docker_health, 120, interval=2)
        assert _health(target) == "SERVING"

        # the same seeded request, in and out of Docker
        text = _generate(target)
        assert len(text) == REQUEST["max_chars"]
        assert text == _generate(host_server)

        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{ports['9090']}/metrics", timeout=10)
            .read()
            .decode()
        )
        assert _metric(metrics, "nlstm_requests_total", {"method": "Generate", "code": "OK"}) == 1.0
        assert (
            _metric(metrics, "nlstm_chars_generated_total", {"model": REQUEST["model"]})
            == REQUEST["max_chars"]
        )

        # non-root, with a home of its own (onnxruntime keeps a file there)
        assert (
            engine.docker("inspect", "--format", "{{.Config.User}}", TAG).stdout.strip() == "10001"
        )
        who = engine.docker(
            "exec", name, "sh", "-c", 'id -u; test -d "$HOME" && test -w "$HOME" && echo "$HOME"'
        ).stdout.split()
        assert who == ["10001", "/home/nlstm"]

        # no torch: not importable, not installed, no file of it anywhere
        probe = (
            "import importlib.util, importlib.metadata as m; "
            "print(importlib.util.find_spec('torch'),"
            " sorted(d.metadata['Name'].lower() for d in m.distributions()))"
        )
        found, dists = engine.docker("exec", name, "python", "-c", probe).stdout.split(" ", 1)
        assert found == "None" and "torch" not in dists and "nvidia" not in dists, dists
        assert "onnxruntime" in dists
        files = engine.docker(
            "exec",
            name,
            "sh",
            "-c",
            r"find / -xdev -path '*-packages/torch*' \( -name torch -o -name 'torch-*' \)"
            " | head -n 3",
        )
        assert files.stdout.strip() == ""

        # SIGTERM (STOPSIGNAL): drains and exits 0, long before Docker's SIGKILL
        start = time.monotonic()
        engine.docker("stop", "-t", str(int(GRACE) + 10), name, timeout=60)
        took = time.monotonic() - start
        state = json.loads(engine.docker("inspect", "--format", "{{json .State}}", name).stdout)
        logs = engine.docker("logs", name)
        log = logs.stdout + logs.stderr
        assert state["ExitCode"] == 0 and not state["OOMKilled"], log
        assert took < GRACE, f"docker stop took {took:.1f} s"
        assert "stopped" in log
        assert "Failed to persist" not in log, log
    finally:
        engine.docker("rm", "-f", name, check=False)


# ------------------------------------------------------------------------------------- the GPU
def test_the_gpu_image_builds_as_far_as_its_base_allows(engine, docker_images, serve_image):
    cuda = os.environ.get("CUDA_IMAGE", "nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04")
    build = docker_images.build("serve-gpu", check=False)
    out = subprocess.CompletedProcess([], 0 if build.ok else 1, "", build.log)
    if engine.docker("image", "inspect", cuda, check=False).returncode == 0:
        assert out.returncode == 0, tail(out.stdout + out.stderr)
        providers = engine.docker(
            "run",
            "--rm",
            "--entrypoint",
            "python",
            "nlstm:serve-gpu",
            "-c",
            "import onnxruntime; print(onnxruntime.get_available_providers())",
        ).stdout
        assert "CUDAExecutionProvider" in providers
        return
    # No registry here: the script names the base it lacks and why it cannot make it.
    assert out.returncode != 0
    assert f"cannot pull {cuda}" in out.stderr and "no Debian recipe stands in for" in out.stderr, (
        out.stderr
    )
    # What can be built: the stages up to the runtime base, whose guard refuses a GPU image
    # on a base without cuDNN 9 (and a VARIANT it does not know) before installing anything.
    for variant, message in (
        ("gpu", "VARIANT=gpu needs a BASE_IMAGE with CUDA 13 and cuDNN 9"),
        ("tpu", "VARIANT must be cpu or gpu, not 'tpu'"),
    ):
        out = engine.docker(
            "build",
            "--force-rm",
            "--target",
            "runtime",
            "--build-arg",
            f"VARIANT={variant}",
            "-t",
            f"nlstm-test-runtime-{variant}",
            str(REPO),
            timeout=600,
            check=False,
        )
        assert out.returncode != 0 and message in out.stdout + out.stderr, tail(
            out.stdout + out.stderr
        )


# ---------------------------------------------------------------------------------- compose
def _prometheus_api(port: int, path: str, **query) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(query)}"
    reply = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert reply["status"] == "success", reply
    return reply["data"]


def test_compose_two_replicas_share_sessions_in_redis_and_prometheus_scrapes_both(
    engine, docker_images, serve_image
):
    """docker-compose.yml's server, server-2, redis and prometheus (Grafana has no local image):
    a session created through replica 1 is served by replica 2 (one Redis, no affinity), and
    Prometheus scrapes both replicas, holds their nlstm_ series and loads the alert rules."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert compose["redis"]["image"] == "nlstm:redis" and compose["server-2"]["image"] == TAG
    docker_images.base(
        compose["prometheus"]["image"]
    )  # Debian's Prometheus where it cannot be pulled
    docker_images.build("redis")  # Debian's redis-server on the (local) Python base
    ports = {
        name: _free_port()
        for name in ("NLSTM_GRPC_PORT", "NLSTM_GRPC_PORT_2", "NLSTM_PROMETHEUS_PORT")
    }
    compose_env = Engine({**engine.env, **{k: str(v) for k, v in ports.items()}})
    project = f"nlstm-test-{os.getpid()}"
    cmd = [*engine.compose_command(), "-p", project, "-f", str(REPO / "docker-compose.yml")]
    services = ["server", "server-2", "redis", "prometheus"]
    try:
        # the images deploy/build-image.sh built (compose v1 builds through docker-py, whose
        # context misses the CLI's build cache: minutes for nothing)
        compose_env.run([*cmd, "up", "-d", "--no-build", *services], timeout=600)
        one, two = (
            f"127.0.0.1:{ports['NLSTM_GRPC_PORT']}",
            f"127.0.0.1:{ports['NLSTM_GRPC_PORT_2']}",
        )
        for target in (one, two):
            _wait(
                f"the composed server at {target} answers SERVING",
                lambda t=target: _health(t) == "SERVING",
                120,
            )
        _generate(one)  # a call without a session

        # a session created through replica 1 and continued through replica 2 (its state in
        # Redis) makes what a session kept on replica 1 makes with the same seeds
        with grpc.insecure_channel(one) as ch1, grpc.insecure_channel(two) as ch2:
            r1, r2 = pb_grpc.InferenceStub(ch1), pb_grpc.InferenceStub(ch2)
            moved, stayed = (
                r1.CreateSession(
                    pb.CreateSessionRequest(model=REQUEST["model"]), timeout=30
                ).session_id
                for _ in range(2)
            )

            def gen(stub, sid: str, seed: int) -> str:
                req = pb.GenerateRequest(
                    session_id=sid, prompt="the ", max_chars=40, temperature=1.0, seed=seed
                )
                return "".join(r.text for r in stub.Generate(req, timeout=60))

            first, second = gen(r1, moved, 1), gen(r2, moved, 2)
            assert (first, second) == (gen(r1, stayed, 1), gen(r1, stayed, 2))
            assert len(set(first + second)) > 3
            assert r2.GetSession(
                pb.GetSessionRequest(session_id=moved), timeout=30
            ).position == 2 * (4 + 40)
            assert r1.GetSession(
                pb.GetSessionRequest(session_id=moved), timeout=30
            ).position == 2 * (4 + 40)
        # Generate calls: replica 1 four (one without a session, three on sessions), replica 2 one
        expected = {"server:9090": 4.0, "server-2:9090": 1.0}

        # Prometheus scrapes both replicas (every 15 s): their targets up, the calls in its series
        def scraped():
            targets = _prometheus_api(ports["NLSTM_PROMETHEUS_PORT"], "targets")["activeTargets"]
            up = {
                t["labels"]["instance"]
                for t in targets
                if t["health"] == "up" and t["labels"]["job"] == "nlstm"
            }
            result = _prometheus_api(
                ports["NLSTM_PROMETHEUS_PORT"],
                "query",
                query='sum by (instance) (nlstm_requests_total{method="Generate",code="OK"})',
            )["result"]
            got = {r["metric"]["instance"]: float(r["value"][1]) for r in result}
            return (up, got) if up == set(expected) and got == expected else None

        _wait(
            "Prometheus scrapes both replicas and holds their Generate calls",
            scraped,
            120,
            interval=3,
        )
        # an nlstm_ gauge from each replica, calls or not
        gauges = _prometheus_api(
            ports["NLSTM_PROMETHEUS_PORT"], "query", query="nlstm_max_sessions"
        )["result"]
        assert {g["metric"]["instance"] for g in gauges} == set(expected)

        # every alert rule of deploy/prometheus/alerts.yml loaded and evaluates without error
        expected_rules = {
            r["alert"]
            for g in yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())[
                "groups"
            ]
            for r in g["rules"]
        }
        groups = _wait(
            "Prometheus evaluated the alert rules",
            lambda: [
                g
                for g in _prometheus_api(ports["NLSTM_PROMETHEUS_PORT"], "rules", type="alert")[
                    "groups"
                ]
                if all(r.get("lastEvaluation", "0001").startswith("2") for r in g["rules"])
            ],
            60,
        )
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(loaded) == expected_rules
        assert all(r["health"] == "ok" for r in loaded.values()), {
            n: r.get("lastError") for n, r in loaded.items()
        }
    finally:
        down = compose_env.run(
            [*cmd, "down", "--remove-orphans", "-v", "-t", "15"], timeout=300, check=False
        )
        assert down.returncode == 0, down.stderr
        left = engine.docker(
            "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"
        ).stdout.split()
        assert left == [], f"compose down left containers: {left}"
