"""The client commands (`nlstm generate`, `score`, `classify`) against an in-process gRPC server
on the tiny exported models: what they print is what the server answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from grpc_calls import gen, per_char_limits

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.formats import image_to_glimpses
from serving.testing.inprocess import ServerThread


@pytest.fixture(scope="module")
def server(models_dir):
    s = ServerThread(models_dir, per_char_limits())
    yield s
    s.close()


def _write_idx(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    import gzip
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(images), 28, 28) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def test_cli_clients_generate_score_and_classify(server, models_dir, tmp_path, capsys):
    from training.cli import main as cli_main

    target = ["--target", f"localhost:{server.running.port}"]
    args = [
        "--model",
        "tiny-char",
        "--prompt",
        "the ",
        "--max-chars",
        "25",
        "--seed",
        "3",
        "--temperature",
        "0.8",
    ]
    onnx = ["--backend", "onnx", "--models", str(models_dir)]  # the local backend
    assert cli_main(["generate", *target, *args]) == 0
    printed = capsys.readouterr().out
    again = "".join(
        r.text
        for r in gen(
            server.stub, model="tiny-char", prompt="the ", max_chars=25, seed=3, temperature=0.8
        )
    )
    assert printed == again + "\n" and len(again) == 25  # streamed as it came, the same text
    # the local backend: the same sequence logic on the exported folder, the same text by seed
    for extra in ([], ["--stop", "a", "--top-k", "3"]):
        assert cli_main(["generate", *target, *args, *extra]) == 0
        served_text = capsys.readouterr().out
        assert cli_main(["generate", *onnx, "--providers", "cpu", *args, *extra]) == 0
        assert capsys.readouterr().out == served_text
    assert (
        served_text.rstrip("\n").endswith("a") and len(served_text) <= 26
    )  # stopped at the stop string
    assert (
        cli_main(["generate", "--backend", "onnx", "--session", "x", "--model", "tiny-char"]) == 2
    )
    assert "--session needs --backend server" in capsys.readouterr().err

    text_file = tmp_path / "text.txt"
    text_file.write_text("the dog sat on the park mat~\n", encoding="utf-8")  # '~' is unknown
    assert cli_main(["score", str(text_file), *target, "--model", "tiny-char", "--per-char"]) == 0
    served = capsys.readouterr().out.splitlines()
    assert (
        cli_main(
            [
                "score",
                str(text_file),
                *onnx,
                "--model",
                "tiny-char",
                "--per-char",
                "--providers",
                "cpu",
            ]
        )
        == 0
    )
    local = capsys.readouterr().out.splitlines()
    # the same characters scored, the same figures (the step graph either way, float32 logits)
    assert served[0].startswith("29 characters") and served[0].endswith("1 unknown")
    assert len(served) == len(local) == 1 + 29
    r = server.stub.Score(
        pb.ScoreRequest(model="tiny-char", text=text_file.read_text(), per_char=True)
    )
    bpc_local = float(local[0].split(", ")[2].split()[0])
    assert bpc_local == pytest.approx(r.bits_per_char, abs=1e-4)
    for a, b in zip(served[1:], local[1:], strict=True):
        assert a.split("\t")[0] == b.split("\t")[0] and float(a.split("\t")[1]) == pytest.approx(
            float(b.split("\t")[1]), abs=2e-3
        )
    # the local backend's own mistakes: one line, exit status 2
    assert cli_main(["score", str(text_file), *onnx, "--model", "tiny-mnist"]) == 2
    assert "glimpse model" in capsys.readouterr().err
    assert cli_main(["score", str(text_file), *onnx, "--model", "nope"]) == 2
    assert "no exported model 'nope'" in capsys.readouterr().err

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 28, 28))
    _write_idx(tmp_path / "mnist", images, np.array([7, 2, 1]))
    classify = ["classify", *target, "--model", "tiny-mnist", "--data-dir", str(tmp_path)]
    assert cli_main([*classify, "--index", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        len(lines) == 21 and lines[-1] == "label: 2" and lines[0].startswith("glimpse  1: class ")
    )
    stream = list(
        server.stub.ClassifyGlimpses(
            iter(
                pb.GlimpseRequest(model="tiny-mnist" if i == 0 else "", pixels=g.tolist())
                for i, g in enumerate(image_to_glimpses(images[1].astype(np.uint8)))
            )
        )
    )
    assert lines[19] == (
        f"glimpse 20: class {stream[-1].predicted_class} (p = {max(stream[-1].probabilities):.3f})"
    )
    assert cli_main([*classify, "--index", "3"]) == 2
    assert "image index must be in [0, 3)" in capsys.readouterr().err
