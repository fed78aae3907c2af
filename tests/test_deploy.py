"""Deployment files, checked without a Docker engine (tests/test_docker.py builds and runs the
images for real where one can run).

- hadolint passes on both Dockerfiles; neither fetches a BuildKit frontend (`# syntax=`);
- the serving Dockerfile keeps its contract (stages, non-root user with a home, ports, health
  check, stop signal, no torch, a CPU build the classic builder keeps cheap: every stage is one
  the serving image needs) and its serving requirements agree with pyproject.toml and cover
  every third-party module that `serving` imports; Dockerfile.train builds the same wheel;
- .dockerignore lets in what the Dockerfiles COPY and nothing else; the Python versions of
  pyproject.toml, the Dockerfiles and the docs agree; the license is an SPDX string;
- deploy/build-image.sh and deploy/local-base.sh refuse what they cannot do, saying why;
- the image's exact entry command (ENTRYPOINT, CMD, ENV, WORKDIR layout) runs outside Docker,
  with torch made unimportable, against the bundled models: its HEALTHCHECK command reports
  healthy, the models and metrics are served, its STOPSIGNAL drains and exits 0.

Compose, Prometheus, Grafana and Envoy are tests/test_deploy_compose.py.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from importlib.metadata import packages_distributions
from pathlib import Path

import grpc
import pytest
import yaml
from dockerfiles import REPO, Stage, parse_dockerfile, serving_stages
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc

DEPLOY = REPO / "deploy"
DOCKERFILES = ("Dockerfile", "Dockerfile.train")


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return serving_stages()


def test_hadolint_passes():
    exe = shutil.which(
        "hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if exe is None:
        pytest.skip("hadolint is not installed (the dev extra installs it on Linux x86_64)")
    for dockerfile in DOCKERFILES:
        out = subprocess.run(
            [exe, str(REPO / dockerfile)], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, dockerfile + ": " + out.stdout + out.stderr


def test_dockerfile_contract(stages):
    serve = stages["serve"]
    assert list(stages) == ["build", "runtime", "venv", "serve"]
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.MULTILINE)
    # one base for the serving stages: python:X-slim, or NVIDIA's CUDA image for VARIANT=gpu
    assert re.search(r"^ARG BASE_IMAGE=python:\$\{PYTHON_VERSION\}-slim$", text, re.MULTILINE)
    assert (
        stages["runtime"].base == "${BASE_IMAGE}" and stages["venv"].base == serve.base == "runtime"
    )
    (guard,) = stages["runtime"].all("RUN")
    assert (
        "libcudnn.so.9" in guard
        and "VARIANT must be cpu or gpu" in guard
        and "--create-home" in guard
    )
    (install,) = stages["venv"].all("RUN")
    # the base install, which is torch-free: the wheel without an extra, the GPU runtime swapped in
    assert re.search(r"/tmp/wheels/\*\.whl(\s|$)", install) and "[train]" not in install
    assert "pip uninstall -y onnxruntime" in install and "onnxruntime-gpu" in install
    assert any("serving.codegen" in r for r in stages["build"].all("RUN")), (
        "gRPC code is generated in the build"
    )
    # no torch anywhere in what the serving image installs
    assert "torch" not in re.sub(r"#.*", "", text)
    requirements = (DEPLOY / "requirements-serve.txt").read_text()
    assert "torch" not in re.sub(r"#.*", "", requirements)
    # the image takes the venv whole: no wheel or requirements file in its layers
    assert serve.all("COPY")[0] == "--from=venv /opt/venv /opt/venv" and not serve.all("RUN")
    # a non-root user, the ports the server listens on, health, stop signal
    (user,) = serve.all("USER")
    assert user.isdigit() and int(user) != 0
    env = serve.env()
    exposed = {p for args in serve.all("EXPOSE") for p in args.split()}
    assert exposed == {env["NLSTM_PORT"], env["NLSTM_METRICS_PORT"]}
    assert serve.exec_form("HEALTHCHECK")[:3] == ["python", "-m", "serving.healthcheck"]
    assert serve.all("STOPSIGNAL") == ["SIGTERM"]
    assert serve.exec_form("ENTRYPOINT") == ["nlstm", "serve"]


def _ancestors(stages: dict[str, Stage], name: str) -> set[str]:
    """The stages `name` is built from: its FROM and every COPY --from, transitively."""
    stage = stages[name]
    parents = {stage.base} | {
        c.split()[0].removeprefix("--from=") for c in stage.all("COPY") if c.startswith("--from=")
    }
    out = {name}
    for parent in parents & set(stages):
        out |= _ancestors(stages, parent)
    return out


def test_the_classic_builder_builds_nothing_the_serving_image_does_not_need(stages):
    # Without BuildKit every stage up to the target is built: each must be one serve needs.
    assert _ancestors(stages, "serve") == set(stages)
    train = {s.name: s for s in parse_dockerfile(REPO / "Dockerfile.train")}
    assert list(train)[-1] == "train" and _ancestors(train, "train") == set(train)


def test_no_dockerfile_needs_a_registry_for_its_frontend():
    for dockerfile in DOCKERFILES:
        first = (REPO / dockerfile).read_text().splitlines()[0]
        assert not re.match(r"#\s*syntax\s*=", first, re.IGNORECASE), (
            f"{dockerfile}: BuildKit would pull {first}"
        )


def test_train_dockerfile_contract(stages):
    train = {s.name: s for s in parse_dockerfile(REPO / "Dockerfile.train")}
    # the same wheel as the serving image: the build stages agree instruction for instruction
    assert train["build"] == stages["build"]
    assert any("torch==${TORCH_VERSION}" in r for r in train["venv"].all("RUN"))
    # the base install is torch-free: training needs the wheel's `train` extra
    assert any('"${wheel}[train]"' in r for r in train["venv"].all("RUN"))
    final = train["train"]
    assert final.exec_form("ENTRYPOINT") == ["nlstm"]
    (user,) = final.all("USER")
    assert user == stages["serve"].all("USER")[0] and any(
        "--create-home --uid 10001" in r for r in final.all("RUN")
    )
    assert final.all("COPY")[0] == "--from=venv /opt/venv /opt/venv"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches a path (or a folder above it) decides."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(p.split("/")[-1], pattern[3:]) for p in prefixes)
        else:
            hit = any(
                fnmatch.fnmatch(p, pattern) and p.count("/") == pattern.count("/") for p in prefixes
            )
        if hit:
            ignored = not negate
    return ignored


def test_dockerignore_lets_in_what_the_dockerfiles_copy_and_nothing_else():
    patterns = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    sources = set()
    for dockerfile in DOCKERFILES:
        for stage in parse_dockerfile(REPO / dockerfile):
            for args in stage.all("COPY"):
                if not args.startswith("--from="):
                    sources |= {s.rstrip("/") for s in args.split()[:-1]}
    for src in sorted(sources):
        files = (
            [src]
            if (REPO / src).is_file()
            else [
                str(p.relative_to(REPO))
                for p in (REPO / src).rglob("*.*")
                if "__pycache__" not in p.parts
            ]
        )
        assert files and not any(_ignored(f, patterns) for f in files), (
            f"{src} is COPYed but .dockerignore keeps it out"
        )
    for outside in (
        ".git/HEAD",
        ".venv/bin/python",
        "runs/x/best.pt",
        "tests/test_deploy.py",
        "docs/deploy.md",
        "serving/__pycache__/server.cpython-311.pyc",
        "Dockerfile",
    ):
        assert _ignored(outside, patterns), f"{outside} would reach the build context"


def test_python_versions_agree():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    requires = SpecifierSet(project["project"]["requires-python"])
    (lowest,) = [s.version for s in requires if s.operator == ">="]
    for dockerfile in DOCKERFILES:
        (default,) = re.findall(
            r"^ARG PYTHON_VERSION=(\S+)$", (REPO / dockerfile).read_text(), re.MULTILINE
        )
        assert requires.contains(f"{default}.0"), (
            f"{dockerfile} builds on Python {default}, outside {requires}"
        )
    assert project["tool"]["ruff"]["target-version"] == "py" + lowest.replace(".", "")
    assert f"Python >= {lowest}" in (REPO / "README.md").read_text()
    doc = (REPO / "docs" / "deploy.md").read_text()
    assert f"`PYTHON_VERSION` ({lowest} to 3.14" in doc, (
        "docs/deploy.md states the images' Python range"
    )


def test_the_license_is_an_spdx_string():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    (setuptools,) = [
        Requirement(r) for r in project["build-system"]["requires"] if r.startswith("setuptools")
    ]
    # SPDX strings need setuptools 77; the table form is deprecated (end of support 2027-02-18)
    assert not setuptools.specifier.contains("76.9") and setuptools.specifier.contains("84.0")


def _script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(DEPLOY / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        check=False,
    )


def test_build_image_script_says_what_it_cannot_do():
    out = _script("build-image.sh", "serve-tpu")
    assert out.returncode == 2 and "serve-cpu|serve-gpu|train" in out.stderr
    out = _script(
        "build-image.sh", "serve-cpu", DOCKER="false"
    )  # `false info` fails like a dead engine
    assert out.returncode == 1 and "no Docker engine answers" in out.stderr
    text = (DEPLOY / "build-image.sh").read_text()
    (cuda,) = re.findall(r"CUDA_IMAGE:-([^}]+)\}", text)
    gpu = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())["services"]["server"][
        "build"
    ]["args"]
    assert gpu["BASE_IMAGE"] == cuda and cuda in (REPO / "Dockerfile").read_text()
    assert re.match(
        r"nvidia/cuda:13\.[\d.]+-cudnn-runtime-", cuda
    )  # onnxruntime-gpu 1.31: CUDA 13, cuDNN 9


def test_local_base_script_stands_in_only_for_what_debian_has():
    out = _script("local-base.sh", "--for-image", "nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04")
    assert out.returncode == 1 and "no Debian recipe stands in for nvidia/cuda" in out.stderr
    out = _script("local-base.sh", "python", "--tag", "python:3.12-slim")
    assert out.returncode == 1 and "python3 is 3.11" in out.stderr
    out = _script("local-base.sh", "redis")
    assert out.returncode == 2


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


def test_serving_requirements_agree_with_pyproject_and_cover_the_imports(stages):
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
    # the image is the base install (its dependencies held to these pins): each one has a pin,
    # but onnxruntime, which the Dockerfile pins by ORT_VERSION (and swaps for the GPU)
    unpinned = {n for n, r in declared.items() if r.marker is None or r.marker.evaluate()} - set(
        pinned
    )
    assert unpinned == {"onnxruntime"}, f"base dependencies without a pin for the image: {unpinned}"
    venv = "\n".join(stages["venv"].all("RUN"))
    assert "-c /tmp/requirements-serve.txt" in venv and "--no-deps" not in venv
    assert '"onnxruntime==$ORT_VERSION"' in venv and '"onnxruntime-gpu==$ORT_VERSION"' in venv
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
        assert re.search(r"^nlstm_max_sessions \d", text, re.MULTILINE)
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
