"""Deployment files, checked without a Docker engine (none runs on these machines).

- hadolint passes on the Dockerfile;
- the Dockerfile keeps its contract (stages, non-root user, ports, health check, stop signal,
  no torch in the serving image) and its serving requirements agree with pyproject.toml and
  cover every third-party module that `serving` imports;
- the image's exact entry command (ENTRYPOINT, CMD, ENV, WORKDIR layout) runs outside Docker,
  with torch made unimportable, against the bundled models: its HEALTHCHECK command reports
  healthy, the models and metrics are served, its STOPSIGNAL drains and exits 0;
- docker-compose.yml, the Prometheus config and alerts, and the Grafana dashboard agree with
  each other and with the metrics the server exports; docker-compose.gpu.yml gives the server
  the CUDA image, an NVIDIA GPU and NLSTM_PROVIDERS=cuda; docs/deploy.md names every setting.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from importlib.metadata import packages_distributions
from pathlib import Path

import grpc
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


# ------------------------------------------------------------------------- Dockerfile parsing
@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                out[key] = value
        return out

    def exec_form(self, keyword: str) -> list[str]:
        (args,) = self.all(keyword)[-1:] or [None]
        if args is None:
            return []
        if keyword == "HEALTHCHECK":
            args = args.split("CMD", 1)[1]
        return json.loads(args)


def parse_dockerfile(path: Path) -> list[Stage]:
    """Instructions by stage: continuation lines joined, comments and parser directives dropped."""
    logical, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, parts[0]))
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    parsed = parse_dockerfile(REPO / "Dockerfile")
    assert parsed[-1].name == "serve", "the serving image must be the default (last) target"
    return {s.name: s for s in parsed}


def test_hadolint_passes():
    exe = shutil.which(
        "hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if exe is None:
        pytest.skip("hadolint is not installed (the dev extra installs it on Linux x86_64)")
    out = subprocess.run(
        [exe, str(REPO / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_contract(stages):
    serve = stages["serve"]
    assert serve.base == "base-${VARIANT}" and {"base-cpu", "base-gpu", "build", "train"} <= set(
        stages
    )
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    # onnxruntime-gpu 1.31 needs CUDA 13 and cuDNN 9: the GPU base is NVIDIA's runtime image
    assert stages["base-gpu"].base == "${CUDA_IMAGE}"
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:13\.[\d.]+-cudnn-runtime-", text, re.M)
    assert stages["base-cpu"].env()["ORT_PACKAGE"] == "onnxruntime"
    assert stages["base-gpu"].env()["ORT_PACKAGE"] == "onnxruntime-gpu"
    assert any("serving.codegen" in r for r in stages["build"].all("RUN")), (
        "gRPC code is generated in the build"
    )
    # no torch anywhere in what the serving image installs
    for name in ("base-cpu", "base-gpu", "serve"):
        assert not any("torch" in r for r in stages[name].all("RUN")), name
    requirements = (DEPLOY / "requirements-serve.txt").read_text()
    assert "torch" not in re.sub(r"#.*", "", requirements)
    assert any("--no-deps" in r for r in serve.all("RUN")), (
        "the wheel must not pull its training dependencies"
    )
    # a non-root user, the ports the server listens on, health, stop signal
    (user,) = serve.all("USER")
    assert user.isdigit() and int(user) != 0
    env = serve.env()
    exposed = {p for args in serve.all("EXPOSE") for p in args.split()}
    assert exposed == {env["NLSTM_PORT"], env["NLSTM_METRICS_PORT"]}
    assert serve.exec_form("HEALTHCHECK")[:3] == ["python", "-m", "serving.healthcheck"]
    assert serve.all("STOPSIGNAL") == ["SIGTERM"]
    assert serve.exec_form("ENTRYPOINT") == ["nlstm", "serve"]
    assert stages["train"].exec_form("ENTRYPOINT") == ["nlstm"]
    assert any("torch==" in r for r in stages["train"].all("RUN"))


def _serving_third_party_modules() -> set[str]:
    """Top-level modules that serving/ imports, apart from the standard library and itself;
    serving/codegen.py is a build-time tool (grpcio-tools), not part of the server."""
    found = set()
    for path in (REPO / "serving").glob("*.py"):
        if path.name == "codegen.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {
        m for m in found if m not in sys.stdlib_module_names and m not in {"serving", "__future__"}
    }


def test_serving_requirements_agree_with_pyproject_and_cover_the_imports():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {
        canonicalize_name(Requirement(r).name): Requirement(r) for r in project["dependencies"]
    }
    pinned = {}
    for line in (DEPLOY / "requirements-serve.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: the image pins exact versions"
            pinned[canonicalize_name(req.name)] = spec.version
    for name, version in pinned.items():
        assert name in declared, f"{name} is in the image but not a dependency in pyproject.toml"
        assert declared[name].specifier.contains(version), (
            f"{name}=={version} breaks {declared[name]}"
        )
    provided = set(pinned) | {"onnxruntime", "onnxruntime-gpu"}  # the Dockerfile adds one of them
    dists = packages_distributions()
    for module in sorted(_serving_third_party_modules()):
        names = {canonicalize_name(d) for d in dists.get(module, [])}
        assert names & provided, (
            f"serving imports {module} ({names or 'not installed'}) but the image lacks it"
        )


# -------------------------------------------------------------------- the image's entry command
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _resolve(argv: list[str]) -> list[str]:
    """The image's PATH is its venv; here the venv running the tests plays that part."""
    bindir = Path(sys.executable).parent
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    exe = shutil.which(argv[0], path=str(bindir))
    assert exe, f"{argv[0]} is not installed beside {sys.executable} (pip install -e .)"
    return [exe, *argv[1:]]


@pytest.mark.slow
def test_the_image_entry_command_serves_the_bundled_models(stages, tmp_path):
    serve = stages["serve"]
    (workdir,) = serve.all("WORKDIR")
    env = serve.env()
    # The image's WORKDIR holds exported/ (COPY exported/ exported/): rebuild that layout here.
    copies = [a.split() for a in serve.all("COPY") if not a.startswith("--from")]
    app = tmp_path / workdir.strip("/")
    for src, dst in (c for c in copies if c[0].rstrip("/") == "exported"):
        shutil.copytree(REPO / src, app / dst)
    bundled = sorted(p.name for p in (REPO / "exported").iterdir() if (p / "meta.json").is_file())
    # torch is not in the image: make every import of it fail in this process tree
    shim = tmp_path / "no-torch"
    (shim / "torch").mkdir(parents=True)
    (shim / "torch" / "__init__.py").write_text(
        "raise ImportError('torch is not in the serving image')\n"
    )
    port, metrics_port = _free_port(), _free_port()
    run_env = {
        **os.environ,
        **{k: v for k, v in env.items() if k != "PATH"},
        "NLSTM_PORT": str(port),
        "NLSTM_METRICS_PORT": str(metrics_port),
        "NLSTM_HOST": "localhost",
        "PYTHONPATH": str(shim),
        "OMP_NUM_THREADS": "1",
    }
    argv = _resolve(serve.exec_form("ENTRYPOINT") + serve.exec_form("CMD"))
    health = _resolve(serve.exec_form("HEALTHCHECK"))
    proc = subprocess.Popen(
        argv, cwd=app, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline, healthy = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            healthy = subprocess.run(
                health, cwd=app, env=run_env, capture_output=True, text=True, check=False
            )
            if healthy.returncode == 0:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
        assert healthy is not None and healthy.returncode == 0, healthy and healthy.stderr
        assert "SERVING" in healthy.stdout
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            listed = pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
        assert sorted(m.name for m in listed.models) == bundled
        text = (
            urllib.request.urlopen(f"http://localhost:{metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
        assert re.search(r"^nlstm_max_sessions \d", text, re.M)
        proc.send_signal(getattr(signal, serve.all("STOPSIGNAL")[0]))
        code = proc.wait(timeout=float(env["NLSTM_GRACE"]) + 15)
        out = proc.stdout.read()
        assert code == 0, out
        assert "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    after = subprocess.run(
        health, cwd=app, env=run_env, capture_output=True, text=True, check=False
    )
    assert after.returncode == 1 and "UNAVAILABLE" in after.stderr


# ----------------------------------------------------------- compose, Prometheus and Grafana
def _exported_samples() -> dict[str, set[str]]:
    """Every metric family of the server and the sample names it exposes."""
    out = {}
    for family in Metrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(
            family.type, [""]
        )
        out[family.name] = {family.name + s for s in suffixes}
    return out


def test_compose_prometheus_and_grafana_fit_together(stages):
    env = stages["serve"].env()
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"server", "server-2", "redis", "prometheus", "grafana"}
    server = services["server"]
    assert server["build"]["context"] == "." and "VARIANT" in server["build"]["args"]
    assert any(p.endswith(f":{env['NLSTM_PORT']}") for p in server["ports"])
    grace = float(server["environment"].get("NLSTM_GRACE", env["NLSTM_GRACE"]))
    assert float(server["stop_grace_period"].rstrip("s")) > grace, (
        "Docker must not SIGKILL a draining server"
    )

    prom = services["prometheus"]
    mounts = dict(v.rsplit(":", 1)[0].split(":") for v in prom["volumes"])
    (config_flag,) = [c for c in prom["command"] if c.startswith("--config.file=")]
    config_path = Path(config_flag.split("=", 1)[1])
    host_dir = next(REPO / h for h, c in mounts.items() if config_path.parent == Path(c))
    config = yaml.safe_load((host_dir / config_path.name).read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"server:{env['NLSTM_METRICS_PORT']}"]
    for rules in config["rule_files"]:
        assert (host_dir / rules).is_file()

    grafana = services["grafana"]
    g_mounts = dict(v.rsplit(":", 1)[0].split(":") for v in grafana["volumes"])
    provisioning = REPO / next(h for h, c in g_mounts.items() if c == "/etc/grafana/provisioning")
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "nlstm.yml").read_text())[
        "providers"
    ]
    dash_dir = REPO / next(h for h, c in g_mounts.items() if c == provider["options"]["path"])
    dashboard = json.loads((dash_dir / "nlstm.json").read_text())
    assert {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]} == {
        source["uid"]
    }


def test_compose_replicas_share_sessions_in_redis():
    """Two replicas of one image, on two host ports, with one Redis session store: no affinity."""
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    a, b, redis = services["server"], services["server-2"], services["redis"]
    assert (
        a["image"] == b["image"]
        and a["build"] == b["build"]
        and a["environment"] == b["environment"]
    )
    assert {p.split(":")[-1] for p in a["ports"] + b["ports"]} == {"50051"}
    assert len({p.rsplit(":", 1)[0] for p in a["ports"] + b["ports"]}) == 2  # two host ports
    store = a["environment"]["NLSTM_SESSION_STORE"]
    assert (
        store.startswith("redis://redis:")
        and "redis" in a["depends_on"]
        and "redis" in b["depends_on"]
    )
    assert b["stop_grace_period"] == a["stop_grace_period"]
    command = redis["command"]
    assert "--appendonly" in command and "noeviction" in command
    assert any(v.endswith(":/data") for v in redis["volumes"])  # sessions outlive a Redis restart
    # Debian's redis-server on the server's base image: no other registry image to pull
    dockerfile = REPO / redis["build"]["context"] / "Dockerfile"
    text = dockerfile.read_text()
    assert "FROM python:${PYTHON_VERSION}-slim" in text and "redis-server" in text
    assert re.search(r'^ENTRYPOINT \["redis-server"\]$', text, re.M) and re.search(
        r"^USER redis$", text, re.M
    )
    exe = shutil.which(
        "hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if exe is not None:
        out = subprocess.run([exe, str(dockerfile)], capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
    from serving.store import open_backend
    from serving.store_redis import RedisBackend

    assert isinstance(open_backend(store), RedisBackend)  # a URL the server takes


def test_compose_gpu_override_reserves_a_gpu_and_requires_cuda(stages):
    base = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["server"]
    override = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())
    assert set(override["services"]) == {"server"}  # merged onto the base file's server only
    server = override["services"]["server"]
    assert server["build"]["args"]["VARIANT"] == "gpu" and "VARIANT" in base["build"]["args"]
    assert f"base-{server['build']['args']['VARIANT']}" in stages  # a variant the Dockerfile has
    assert server["image"] == "nlstm-serve:gpu"
    assert server["environment"]["NLSTM_PROVIDERS"] == "cuda"
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert (
        device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    )
    # Compose merges mappings key by key: the base's settings (ports, grace, ...) stay
    assert not set(server) & {"ports", "stop_grace_period", "restart"}
    assert not set(server["environment"]) & set(base["environment"])
    for text in (
        (REPO / "docs" / "deploy.md").read_text(),
        (REPO / "docker-compose.yml").read_text(),
    ):
        assert "-f docker-compose.yml -f docker-compose.gpu.yml" in text


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bnlstm_[a-z_]+", expr))


def test_dashboard_and_alerts_use_only_exported_metrics_and_show_them_all():
    samples = _exported_samples()
    known = set().union(*samples.values())
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "nlstm.json").read_text())
    shown = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = _metric_names(target["expr"])
            assert names, f"panel {panel['title']!r}: a query without an nlstm metric"
            assert names <= known, f"panel {panel['title']!r} asks for unknown {names - known}"
            shown |= names
    missing = [f for f, s in samples.items() if not s & shown]
    assert not missing, f"metrics the server exports but the dashboard does not show: {missing}"
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert rules and all({"alert", "expr", "for", "labels", "annotations"} <= set(r) for r in rules)
    for rule in rules:
        assert _metric_names(rule["expr"]) <= known, rule["alert"]
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]


def test_deploy_docs_name_every_setting():
    help_text = subprocess.run(
        [sys.executable, "-m", "training.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    settings = set(re.findall(r"\[(NLSTM_[A-Z_]+)\]", help_text))
    assert len(settings) >= 10, help_text
    doc = (REPO / "docs" / "deploy.md").read_text()
    missing = sorted(s for s in settings if s not in doc)
    assert not missing, f"docs/deploy.md does not describe {missing}"
    for word in ("session affinity", "NOT_FOUND", "VARIANT=gpu", "--target train", "HEALTHCHECK"):
        assert word in doc, word


def test_envoy_routes_a_session_key_to_one_healthy_replica(stages):
    config = yaml.safe_load((DEPLOY / "envoy.yaml").read_text())["static_resources"]
    (cluster,) = config["clusters"]
    assert (
        cluster["lb_policy"] == "RING_HASH" and "grpc_health_check" in cluster["health_checks"][0]
    )
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert (
        str(endpoint["endpoint"]["address"]["socket_address"]["port_value"])
        == stages["serve"].env()["NLSTM_PORT"]
    )
    (listener,) = config["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    headers = [h["header"]["header_name"] for h in route["route"]["hash_policy"]]
    assert headers == ["x-nlstm-session-key"] and route["route"]["cluster"] == cluster["name"]
    assert "x-nlstm-session-key" in (REPO / "docs" / "deploy.md").read_text()
