"""The deployment around the image, checked without a Docker engine: docker-compose.yml, the
Prometheus config and alerts, and the Grafana dashboard agree with each other and with the
metrics the server exports; the replicas share sessions in Redis; docker-compose.gpu.yml gives
the server the CUDA image, an NVIDIA GPU and NLSTM_PROVIDERS=cuda; docs/deploy.md names every
setting; Envoy routes a session key to one healthy replica.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfiles import REPO, Stage, serving_stages

from serving.metrics import Metrics

DEPLOY = REPO / "deploy"


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return serving_stages()


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
    # every replica is a target of its own
    replicas = sorted(name for name, svc in services.items() if svc.get("image") == server["image"])
    assert replicas == ["server", "server-2"]
    assert job["static_configs"][0]["targets"] == [
        f"{r}:{env['NLSTM_METRICS_PORT']}" for r in replicas
    ]
    assert set(replicas) <= set(prom["depends_on"])
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
    assert re.search(r'^ENTRYPOINT \["redis-server"\]$', text, re.MULTILINE) and re.search(
        r"^USER redis$", text, re.MULTILINE
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
    assert set(override["services"]) == {"server", "server-2"}  # merged onto both replicas
    assert override["services"]["server-2"] == override["services"]["server"]
    server = override["services"]["server"]
    assert server["build"]["args"]["VARIANT"] == "gpu" and "VARIANT" in base["build"]["args"]
    assert server["build"]["args"]["BASE_IMAGE"].startswith(
        "nvidia/cuda:13."
    )  # the runtime guard's need
    assert (
        server["image"] == "nlstm:serve-gpu" and base["image"] == "nlstm:serve-cpu"
    )  # build-image.sh's tags
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
    for word in (
        "session affinity",
        "NOT_FOUND",
        "VARIANT=gpu",
        "Dockerfile.train",
        "HEALTHCHECK",
        "deploy/build-image.sh",
        "deploy/local-base.sh",
        "--ipc=host",
        "--shm-size",
        "chown 10001",
    ):
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
