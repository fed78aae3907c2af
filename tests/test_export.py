"""ONNX export, the folder: what an exported folder holds and its meta.json says, the sequence
graph shipped only when measured faster, refused and half-written folders, the runtime over a
folder against torch, and `nlstm export`. The graphs' parity and contract are
tests/test_export_graphs.py.

Every model here is small and random; checkpoints are written to tmp_path with
training.checkpoint.save_checkpoint. Graphs run on onnxruntime's CPU provider.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from export_models import TEXT, TOL, H, make_model

from serving.formats import (
    EXPORT_FORMAT_VERSION,
    ExportFormatError,
    ExportMeta,
    Tokenizer,
    start_id,
)
from serving.runtime import load_model
from training.checkpoint import Checkpoint, save_checkpoint
from training.cli import main as cli_main
from training.data.tokenizer import train_char_tokenizer
from training.export import (
    export_checkpoint,
    export_model,
)
from training.models import pack_state, state_slots, unpack_state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return train_char_tokenizer([TEXT])


# ------------------------------------------------------------------------------- the folder
# what the trainer's checkpoints hold: the latest evaluation record, with the best so far
METRICS = {
    "type": "eval",
    "epoch": 7,
    "step": 700,
    "train_bpc": 1.9,
    "valid_bpc": 2.05,
    "test_bpc": 2.15,
    "best_valid_bpc": 2.0,
    "best_test_bpc": 2.1,
    "best_epoch": 6,
    "best_step": 600,
    "train_items_per_s": 1e4,
    "history": [1.0, float("nan")],
}
TRAIN_CONFIG = {"task": "ptb", "lr": 0.002, "batch_size": 32}
HARDWARE = {
    "device": "cuda:0",
    "name": "NVIDIA H200",
    "processes": 1,
    "cpu_count": 16,
    "torch_threads": 16,
}


def write_checkpoint(path, model, tok, task="ptb"):
    save_checkpoint(
        Checkpoint(
            task=task,
            model_config=model.config,
            model=model.state_dict(),
            tokenizer=tok.model_proto if model.config.kind == "char" else None,
            train_config=TRAIN_CONFIG,
            step=700,
            epoch=7,
            metrics=METRICS,
            extra={"hardware": HARDWARE},
        ),
        path,
    )
    return path


@pytest.fixture(scope="module")
def char_export(tok, tmp_path_factory):
    """A char NLSTM (depth 2, 2 layers) exported from a checkpoint, with its sequence graph."""
    root = tmp_path_factory.mktemp("char")
    model = make_model(tok, seed=3, kind="char", core="nlstm", depth=2, num_layers=2)
    ckpt = write_checkpoint(root / "model.pt", model, tok)
    export_checkpoint(ckpt, root / "export", sequence="always")
    return model, root / "export"


@pytest.fixture(scope="module")
def glimpse_export(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("glimpse")
    model = make_model(tok, seed=4, kind="glimpse", core="lstm", num_layers=2)
    export_model(
        model,
        root / "export",
        task="mnist",
        tokenizer=None,
        metrics={"valid_acc": 0.5},
        sequence="never",
    )
    return model, root / "export"


def copy_export(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_folder_holds_the_graphs_tokenizer_and_meta(char_export, tok):
    folder = char_export[1]
    assert sorted(p.name for p in folder.iterdir()) == [
        "meta.json",
        "model.onnx",
        "sequence.onnx",
        "tokenizer.model",
    ]
    assert (folder / "tokenizer.model").read_bytes() == tok.model_proto
    for name in ("model.onnx", "sequence.onnx"):
        # self-contained: every weight inside the file, none in external data
        proto = onnx.load(str(folder / name), load_external_data=False)
        assert proto.graph.initializer and not any(
            i.data_location == onnx.TensorProto.EXTERNAL or i.external_data
            for i in proto.graph.initializer
        )
        onnx.checker.check_model(str(folder / name), full_check=True)
    assert not [
        p for p in folder.parent.iterdir() if p.name.startswith(".")
    ]  # no temp folders left
    # readable by other users (a container's non-root server), not mkdtemp's private 0700
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


def test_meta_json_describes_the_model(char_export, tok):
    model, folder = char_export
    d = json.loads((folder / "meta.json").read_text())
    cfg = model.config
    assert d["format"] == "nlstm-export" and d["format_version"] == EXPORT_FORMAT_VERSION
    assert (d["task"], d["kind"], d["core"], d["depth"], d["num_layers"], d["hidden_size"]) == (
        "ptb",
        "char",
        "nlstm",
        2,
        2,
        H,
    )
    assert d["vocab_size"] == tok.vocab_size and d["num_classes"] is None
    assert (d["input_name"], d["input_dtype"]) == ("tokens", "int64")
    assert (
        d["state_slots"]
        == state_slots(cfg)
        == ["layer0.h", "layer0.c0", "layer0.c1", "layer1.h", "layer1.c0", "layer1.c1"]
    )
    assert d["figures"] == {"valid_bpc": 2.0, "test_bpc": 2.1, "best_epoch": 6, "best_step": 600}
    assert d["metrics"]["history"] == [1.0, None]  # NaN is not JSON: written as null
    assert d["train_config"] == TRAIN_CONFIG and d["model_config"] == cfg.to_dict()
    assert d["sequence_graph"] is True and d["sequence_timing"]["mode"] == "always"
    assert d["sequence_timing"]["shipped"] is True and d["sequence_timing"]["torch_loaded"] is False
    assert d["source"]["step"] == 700 and d["source"]["parity_max_diff"] <= TOL
    assert d["source"]["trained_on"] == HARDWARE  # what the checkpoint says it trained on
    from serving.formats import file_sha256

    assert d["files"] == {
        n: file_sha256(folder / n) for n in ("model.onnx", "sequence.onnx", "tokenizer.model")
    }
    meta = ExportMeta.from_folder(folder)
    assert ExportMeta.from_json(meta.to_json()) == meta


def test_glimpse_meta_and_no_sequence_graph(glimpse_export):
    folder = glimpse_export[1]
    meta = ExportMeta.from_folder(folder)
    assert (meta.kind, meta.core, meta.depth, meta.input_name, meta.input_dtype) == (
        "glimpse",
        "lstm",
        1,
        "glimpse",
        "float32",
    )
    assert (meta.input_size, meta.num_classes, meta.vocab_size) == (49, 10, None)
    assert meta.state_slots == ["layer0.h", "layer0.c", "layer1.h", "layer1.c"]
    assert meta.figures == {"valid_acc": 0.5} and not meta.sequence_graph
    assert sorted(meta.files) == ["model.onnx"]


def test_auto_ships_the_sequence_graph_only_when_it_measured_faster(tok, tmp_path):
    model = make_model(tok, kind="char", core="lstm")
    meta = export_model(model, tmp_path / "e", task="t", tokenizer=tok.model_proto)
    t = meta.sequence_timing
    assert (
        t["mode"] == "auto"
        and t["step_graph_loop_us_per_step"] > 0
        and t["sequence_graph_us_per_step"] > 0
    )
    assert meta.sequence_graph == t["shipped"] == (t["speedup"] > 1.0)
    assert (tmp_path / "e" / "sequence.onnx").exists() == meta.sequence_graph
    # timed by serving.runtime in a subprocess that loaded neither torch nor the training code
    assert (
        t["torch_loaded"] is False and t["training_loaded"] is False and "subprocess" in t["what"]
    )
    load_model(tmp_path / "e")  # the published meta.json, not the provisional one, matches


def test_a_failed_timing_ships_the_sequence_graph_only_when_asked_to(tok, tmp_path, monkeypatch):
    import training.export as export

    # the timing program fails: its command line replaced by one that exits with a message
    monkeypatch.setattr(
        export, "TIMING_COMMAND", [sys.executable, "-c", "import sys; sys.exit('no timing here')"]
    )
    model = make_model(tok, kind="glimpse", core="lstm")
    auto = export_model(model, tmp_path / "auto", task="t", tokenizer=None)
    t = auto.sequence_timing
    assert "no timing here" in t["error"] and t["shipped"] is False and not auto.sequence_graph
    assert (
        sorted(auto.files) == ["model.onnx"] and not (tmp_path / "auto" / "sequence.onnx").exists()
    )
    always = export_model(model, tmp_path / "always", task="t", tokenizer=None, sequence="always")
    assert always.sequence_graph and always.sequence_timing["shipped"] is True
    assert load_model(tmp_path / "always").has_sequence_graph


def test_hash_mismatch_and_missing_files_are_refused(char_export, tmp_path):
    folder = copy_export(char_export[1], tmp_path)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportFormatError, match=re.escape("model.onnx does not match its sha256")):
        load_model(folder)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(ExportFormatError, match="missing"):
        load_model(folder)


def test_unknown_format_version_and_foreign_folders_are_refused(char_export, tmp_path):
    folder = copy_export(char_export[1], tmp_path)
    d = json.loads((folder / "meta.json").read_text())
    d["format_version"] = 99
    (folder / "meta.json").write_text(json.dumps(d))
    with pytest.raises(ExportFormatError, match=r"version 99.*reads versions \(1, 2\)"):
        load_model(folder)
    d["format_version"], d["colour"] = EXPORT_FORMAT_VERSION, "blue"
    (folder / "meta.json").write_text(json.dumps(d))
    with pytest.raises(ExportFormatError, match=r"unknown keys.*colour"):
        load_model(folder)
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(ExportFormatError, match="not valid JSON"):
        load_model(folder)
    (folder / "meta.json").unlink()
    with pytest.raises(ExportFormatError, match=re.escape("no meta.json")):
        load_model(folder)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent")


def test_export_refuses_other_folders_and_replaces_an_old_export(tok, tmp_path):
    model = make_model(tok, kind="char", core="lstm")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an exported model"):
        export_model(model, precious, task="t", tokenizer=tok.model_proto, sequence="never")
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]

    out = tmp_path / "out"
    export_model(model, out, task="first", tokenizer=tok.model_proto, sequence="never")
    export_model(model, out, task="second", tokenizer=tok.model_proto, sequence="never")
    assert ExportMeta.from_folder(out).task == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "precious"]


def test_a_failed_export_leaves_no_half_written_folder(tok, tmp_path, monkeypatch):
    import training.export as export

    model = make_model(tok, kind="char", core="lstm")
    out = tmp_path / "out"
    export_model(model, out, task="old", tokenizer=tok.model_proto, sequence="never")

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export, "file_sha256", crash)
    with pytest.raises(OSError, match="disk full"):
        export_model(model, out, task="new", tokenizer=tok.model_proto, sequence="never")
    assert ExportMeta.from_folder(out).task == "old"  # the previous export, intact
    load_model(out)
    with pytest.raises(OSError, match="disk full"):
        export_model(
            model, tmp_path / "fresh", task="new", tokenizer=tok.model_proto, sequence="never"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_char_models_need_their_tokenizer(tok, tmp_path):
    model = make_model(tok, kind="char", core="lstm")
    with pytest.raises(ValueError, match="tokenizer"):
        export_model(model, tmp_path / "a", task="t", tokenizer=None)
    other = train_char_tokenizer(["abc"])
    with pytest.raises(ValueError, match="symbols but the model's vocab_size"):
        export_model(model, tmp_path / "b", task="t", tokenizer=other.model_proto)
    with pytest.raises(ValueError, match="sequence must be one of"):
        export_model(
            model, tmp_path / "c", task="t", tokenizer=tok.model_proto, sequence="sometimes"
        )
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ the runtime
def torch_logits(model, x, state=None):
    with torch.no_grad():
        logits, final = model(
            torch.as_tensor(x),
            None if state is None else unpack_state(torch.as_tensor(state), model.config),
        )
    return logits.numpy(), pack_state(final).numpy()


def test_runtime_step_and_run_match_torch(char_export, tok):
    model, folder = char_export
    m = load_model(folder, providers="cpu", intra_op_threads=1, inter_op_threads=1)
    assert m.device == "cpu" and m.providers == ["CPUExecutionProvider"] and m.has_sequence_graph
    assert m.state_slots == state_slots(model.config) and m.output_size == tok.vocab_size
    state = m.initial_state(3)
    assert state.shape == (3, 6, H) and state.dtype == np.float32 and not state.any()
    x = np.random.default_rng(0).integers(0, tok.vocab_size, size=(40, 3))
    want_logits, want_state = torch_logits(model, x)
    s = None
    for t in range(40):
        logits, s = m.step(x[t], s)
        np.testing.assert_allclose(logits, want_logits[t], atol=TOL)
    np.testing.assert_allclose(s, want_state, atol=TOL)
    logits, s = m.run(x)  # the sequence graph, one call
    np.testing.assert_allclose(logits, want_logits, atol=TOL)
    np.testing.assert_allclose(s, want_state, atol=TOL)


def test_score_is_bits_per_char_as_torch_computes_it(char_export, tok, tmp_path):
    model, folder = char_export
    text = "the lazy fox jumps, quick brown dog! ~"  # '~' is outside the vocabulary
    # every character is scored, the first from the start symbol (as the server does)
    ids = np.concatenate([[start_id(Tokenizer.from_bytes(tok.model_proto))], tok.encode(text).ids])
    logits, _ = torch_logits(model, ids[:-1, None])
    each = F.cross_entropy(
        torch.from_numpy(logits[:, 0]), torch.from_numpy(ids[1:]), reduction="none"
    ).numpy()
    nats = float(each.sum())
    with_seq = load_model(folder).score(text)
    assert with_seq.chars == len(text) and with_seq.unknown_chars == 1
    assert with_seq.bits_per_char == pytest.approx(nats / len(text) / math.log(2), abs=1e-5)
    assert with_seq.perplexity == pytest.approx(math.exp(nats / len(text)), rel=1e-5)
    np.testing.assert_allclose(with_seq.bits, each / math.log(2), atol=1e-4)
    # without the sequence graph the step graph runs per character: the same figure
    step_only = copy_export(folder, tmp_path)
    meta = ExportMeta.from_folder(step_only)
    (step_only / "sequence.onnx").unlink()
    meta.files.pop("sequence.onnx")
    meta.sequence_graph = False
    (step_only / "meta.json").write_text(meta.to_json())
    m = load_model(step_only)
    assert not m.has_sequence_graph
    assert m.score(text).bits_per_char == pytest.approx(with_seq.bits_per_char, abs=1e-5)
    np.testing.assert_allclose(m.score(text).state, with_seq.state, atol=TOL)


def test_classify_matches_the_torch_last_step(glimpse_export):
    model, folder = glimpse_export
    m = load_model(folder)
    g = np.random.default_rng(1).random((3, 20, 49), dtype=np.float32)
    want, _ = torch_logits(model, g.transpose(1, 0, 2))
    np.testing.assert_allclose(m.classify(g), want[-1], atol=TOL)
    np.testing.assert_allclose(m.classify(g[1]), want[-1, 1], atol=TOL)
    with pytest.raises(ValueError, match="for char models"):
        m.score("text")


def test_runtime_rejects_bad_inputs_with_clear_errors(char_export, glimpse_export):
    m = load_model(char_export[1])
    V = m.output_size
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {V}\)"):
        m.step(np.array([0, V]))
    with pytest.raises(ValueError, match=r"tokens must be integer ids of shape \(B\)"):
        m.step(np.array([[1, 2]]))
    with pytest.raises(
        ValueError, match=r"state must be floats of shape \(B, S, H\) = \(2, 6, 12\)"
    ):
        m.step(np.array([1, 2]), np.zeros((2, 5, H)))
    with pytest.raises(ValueError, match="batch must be"):
        m.initial_state(0)
    with pytest.raises(ValueError, match="at least two ids"):
        m.score_ids([1])
    with pytest.raises(ValueError, match="must not be empty"):
        m.score("")
    g = load_model(glimpse_export[1])
    with pytest.raises(ValueError, match=r"glimpses must be floats of shape \(B, 49\)"):
        g.step(np.zeros((2, 48), np.float32))


def test_unchecked_step_is_the_same_step(char_export):
    """check=False (the server's scheduler) skips the method's checks, not onnxruntime's."""
    m = load_model(char_export[1])
    x = np.array([1, 2, 3], np.int64)
    state = np.random.default_rng(0).normal(size=(3, *m.state_shape)).astype(np.float32)
    for want, got in zip(m.step(x, state), m.step(x, state, check=False), strict=True):
        np.testing.assert_array_equal(want, got)
    with pytest.raises(Exception, match=r"(?i)data type|type"):  # onnxruntime's own error
        m.step(x.astype(np.float32), state, check=False)


def test_providers_and_threads_are_settings(char_export):
    folder = char_export[1]
    import onnxruntime as ort

    auto = load_model(folder)  # "auto": CUDA only if a created session really runs on it
    assert auto.device == ("cuda" if auto.providers[0] == "CUDAExecutionProvider" else "cpu")
    assert load_model(folder, providers=["CPUExecutionProvider"]).device == "cpu"
    with pytest.raises(ValueError, match="providers must be one of"):
        load_model(folder, providers="tpu")
    with pytest.raises(ValueError, match="intra_op_threads must be an integer >= 0"):
        load_model(folder, intra_op_threads=-1)
    if auto.device == "cpu":
        # this machine cannot run CUDA (no GPU build, or no GPU / CUDA libraries): a clear error
        with pytest.raises(RuntimeError, match="providers='cuda'"):
            load_model(folder, providers="cuda")
    else:  # pragma: no cover - GPU machines
        assert "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.gpu
def test_cuda_provider_with_io_binding_matches_torch(char_export):
    model, folder = char_export
    m = load_model(folder, providers="cuda")
    assert m.device == "cuda"
    x = np.random.default_rng(2).integers(0, m.output_size, size=(200, 5))
    want_logits, want_state = torch_logits(model, x)
    s = None
    for t in range(200):
        logits, s = m.step(x[t], s)
    np.testing.assert_allclose(logits, want_logits[-1], atol=1e-4)
    logits, s = m.run(x)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4)
    np.testing.assert_allclose(s, want_state, atol=1e-4)


def test_runtime_imports_no_torch_and_nothing_from_training(char_export):
    code = (
        "import sys\n"
        "from serving.runtime import load_model\n"
        f"m = load_model({str(char_export[1])!r})\n"
        "m.score('the quick brown fox')\n"
        "bad = sorted(k for k in sys.modules\n"
        "             if k == 'torch' or k.startswith(('torch.', 'training')))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---------------------------------------------------------------------------------- the CLI
def test_cli_export(tok, tmp_path, capsys):
    model = make_model(tok, kind="char", core="nlstm", depth=2)
    ckpt = write_checkpoint(tmp_path / "m.pt", model, tok)
    assert cli_main(["export", str(ckpt), "--out", str(tmp_path / "out"), "--no-sequence"]) == 0
    out = capsys.readouterr().out
    assert "exported ptb char nlstm" in out and "layer0.h, layer0.c0, layer0.c1" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "meta.json",
        "model.onnx",
        "tokenizer.model",
    ]
    assert load_model(tmp_path / "out").score("the lazy dog").chars == 12
    # a folder that is not an export: one clear line, exit status 2
    assert cli_main(["export", str(ckpt), "--out", str(tmp_path), "--no-sequence"]) == 2
    assert "not an exported model" in capsys.readouterr().err
