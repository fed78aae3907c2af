"""The serving side of the `nlstm` command as a new user meets it: the base install without
torch, a port already in use, no server running, the client commands' help, codegen without
grpcio-tools. Real server processes on the bundled MNIST model (small, loads in a second)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import grpc
import pytest
from serve_process import port_in_log, serve_argv, start_serve

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from training.cli import main

REPO = Path(__file__).resolve().parents[1]
TRAIN_EXTRA = ("torch", "onnx", "onnxscript", "matplotlib")


def _blocker(modules) -> str:
    """Python source that makes `modules` unimportable, as if they were not installed."""
    return f"""
import sys
class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {set(modules)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
"""


def _nlstm_without(modules, args: list[str], **kw) -> subprocess.CompletedProcess:
    """`nlstm ARGS` in a fresh interpreter where `modules` cannot be imported; it prints, last,
    which of them got imported anyway."""
    code = _blocker(modules) + (
        "from training.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print('imported:', sorted(m for m in sys.modules if m.partition('.')[0] in "
        f"{set(modules)!r}))\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        timeout=120,
        **kw,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mnist_models(tmp_path_factory) -> Path:
    """A models folder holding only the bundled MNIST classifier (fast to load)."""
    root = tmp_path_factory.mktemp("models")
    (root / "mnist-nlstm").symlink_to(REPO / "exported" / "mnist-nlstm", target_is_directory=True)
    return root


def _start_server(models: Path, *extra: str, blocked=()) -> tuple[subprocess.Popen, int]:
    """`nlstm serve --port 0 EXTRA` in its own process, where `blocked` modules cannot be
    imported; returns it and the gRPC port it logged (killed if it logs none)."""
    proc = start_serve(models, *extra, cwd=REPO, prelude=_blocker(blocked) if blocked else "")
    try:
        return proc, port_in_log(proc, r"serving .* on port (\d+)")
    except BaseException:
        proc.kill()
        raise


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------------- the base install: no torch
def test_the_base_install_declares_no_training_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in project["dependencies"]}
    assert not names & {*TRAIN_EXTRA, "onnxruntime-gpu"}, names
    assert {"onnxruntime", "grpcio", "numpy", "sentencepiece"} <= names
    extras = project["optional-dependencies"]
    train = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in extras["train"]}
    assert set(TRAIN_EXTRA) <= train
    assert "nlstm[train]" in extras["dev"]  # the tests train and export


def test_serving_commands_run_without_torch(tmp_path):
    """generate and score --backend onnx, data and serve work where the train extra's modules
    cannot be imported, and import none of them."""
    out = _nlstm_without(
        TRAIN_EXTRA,
        [
            "generate",
            "--backend",
            "onnx",
            "--model",
            "ptb-nlstm",
            "--prompt",
            "the ",
            "--max-chars",
            "20",
            "--seed",
            "1",
            "--providers",
            "cpu",
        ],
    )
    assert out.returncode == 0, out.stderr
    text, imported = out.stdout.splitlines()
    assert len(text) == 20 and imported == "imported: []"
    sample = tmp_path / "sample.txt"
    sample.write_text("the company said it expects\n", encoding="utf-8")
    out = _nlstm_without(
        TRAIN_EXTRA,
        ["score", str(sample), "--backend", "onnx", "--model", "ptb-nlstm", "--providers", "cpu"],
    )
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(
        r"28 characters, [\d.]+ bits, [\d.]+ bits/char\nimported: \[\]\n", out.stdout
    )
    # nlstm data (downloads, tokenizers, caches) and every serving module import without them too
    code = (
        _blocker(TRAIN_EXTRA)
        + "import training.data, training.cli, serving.server, serving.client; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert out.stdout == "ok\n", out.stderr


def test_serve_runs_without_torch(mnist_models):
    proc, port = _start_server(mnist_models, "--metrics-port", "-1", blocked=TRAIN_EXTRA)
    try:
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            models = (
                pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10).models
            )
            assert [m.name for m in models] == ["mnist-nlstm"]
    finally:
        assert _stop(proc) == 0


@pytest.mark.parametrize(
    "args, missing",
    [
        (["train", "configs/smoke.toml", "--run-dir", "never"], "torch"),
        (["export", "x.pt", "--out", "never"], "torch, onnx, onnxscript"),
        (["params"], "torch"),
        (["plot", "never"], "torch, matplotlib"),
    ],
)
def test_training_commands_name_the_extra_to_install(args, missing):
    out = _nlstm_without(TRAIN_EXTRA, args)
    assert out.returncode == 2
    err = out.stderr.strip()
    assert err.startswith(
        f"nlstm {args[0]}: error: this command needs {missing}, which the base install"
    )
    assert "pip install 'nlstm[train]'" in err and "https://download.pytorch.org/whl/cpu" in err
    assert "Traceback" not in err and not Path(REPO / "never").exists()


def test_codegen_without_grpcio_tools_says_what_to_install():
    code = (
        _blocker(["grpc_tools"])
        + "import runpy; runpy.run_module('serving.codegen', run_name='__main__')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "--check"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        timeout=60,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "pip install grpcio-tools==1.85.1" in out.stderr and "the dev extra" in out.stderr


# --------------------------------------------------------------------------------- the server
def test_a_port_in_use_is_an_error_naming_it(mnist_models):
    """A second server on the first one's port fails (gRPC's SO_REUSEPORT would let both listen
    and calls reach either); so does a taken metrics port. The first server keeps serving."""
    first, port = _start_server(mnist_models, "--metrics-port", "-1")
    try:
        second = subprocess.run(
            serve_argv(mnist_models, "--port", str(port), "--metrics-port", "-1"),
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
            check=False,
        )
        assert second.returncode == 2
        err = second.stderr.strip().splitlines()[-1]
        assert err.startswith(
            f"nlstm serve: error: cannot listen on port {port} (localhost): the port is "
            "already in use (another nlstm serve?)"
        ), second.stderr
        assert "--port N (0 picks a free port)" in err
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            for _ in range(4):  # every call reaches the first server
                assert (
                    stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0].name
                    == "mnist-nlstm"
                )
    finally:
        assert _stop(first) == 0
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        metrics_port = taken.getsockname()[1]
        out = subprocess.run(
            serve_argv(mnist_models, "--port", "0", "--metrics-port", str(metrics_port)),
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
            check=False,
        )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"nlstm serve: error: cannot serve metrics on port {metrics_port}: Address already in use "
        "(another nlstm serve?); pass --metrics-port N, or -1 to turn metrics off"
    )


# -------------------------------------------------------------------------------- the clients
@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--model", "ptb-nlstm"],
        ["score", "README.md", "--model", "ptb-nlstm"],
        ["classify", "--model", "mnist-nlstm", "--data-dir", str(REPO / "tests")],
    ],
)
def test_no_server_fails_at_once_and_says_how_to_start_one(command, capsys, tmp_path):
    if command[0] == "classify":  # a readable image, so that the client gets as far as connecting
        import gzip
        import struct

        (tmp_path / "mnist").mkdir()
        with gzip.open(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, 1, 28, 28) + bytes(28 * 28))
        with gzip.open(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, 1) + bytes(1))
        command = [*command[:-1], str(tmp_path)]
    target = f"localhost:{_free_port()}"  # nothing listens there
    started = time.monotonic()
    assert main([*command, "--target", target]) == 2
    took = time.monotonic() - started
    err = capsys.readouterr().err.strip()
    assert took < 5, took  # not the 10 s connection deadline
    assert err.startswith(
        f"nlstm {command[0]}: error: no nlstm server answers at {target} (the connection "
        "failed: nothing listens there): start one with `nlstm serve`"
    )
    assert ("--backend onnx" in err) == (command[0] != "classify")


def test_classify_without_the_data_names_the_download_command(tmp_path, capsys, monkeypatch):
    assert main(["classify", "--model", "mnist-nlstm", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"nlstm classify: error: no MNIST file {tmp_path / 't10k-images-idx3-ubyte.gz'}: "
        f"`nlstm data download mnist --data-dir {tmp_path}` fetches it, or pass --data-dir DIR "
        "where DIR/mnist/ holds the MNIST .gz files"
    )
    # without --data-dir: where `nlstm data download mnist` puts the files
    monkeypatch.setenv("NLSTM_DATA_DIR", str(tmp_path / "raw"))
    assert main(["classify", "--model", "mnist-nlstm"]) == 2
    assert f"nlstm data download mnist --data-dir {tmp_path / 'raw'}`" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, wanted",
    [
        (
            "generate",
            [
                "Sample text from a character model",
                "(default: 200)",
                "(default: 1)",
                "(default: server)",
                "(default: a random one)",
            ],
        ),
        (
            "classify",
            [
                "20 glimpses of 7x7 pixels",
                "(default: 0)",
                "nlstm data download mnist",
                "(default: localhost:50051)",
                "(default: the same as nlstm data's",
            ],
        ),
        ("score", ["Bits per character of a text file", "(default: off)", "(default: server)"]),
    ],
)
def test_client_help_has_a_description_and_defaults(command, wanted, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for phrase in wanted:
        assert phrase in text, phrase
