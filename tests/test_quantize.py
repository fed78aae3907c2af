"""Quantized exports (training/quantize.py): exported graphs that standard ONNX tooling takes as
they are, int8 folders measured against their float32 source, the refusal over a threshold,
meta.json's precision, ListModels, and the `nlstm quantize` / `nlstm export --quantize` commands.

Small random models on synthetic data run everywhere; the bundled models and the real datasets
are used where ../shared/data exists. Graphs run on onnxruntime's CPU provider; the float16
graph also on CUDA where a GPU is lent (marked gpu).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from serving.formats import ExportFormatError, ExportMeta
from serving.runtime import load_model
from serving.servicer import model_info
from training.data.task import GlimpseSplit, StreamSplit
from training.data.tokenizer import train_char_tokenizer
from training.export import export_model
from training.models import ModelConfig, build_model
from training.quantize import (
    EvalData,
    QuantizationCost,
    Thresholds,
    evaluate,
    quantize_folder,
)

REPO = Path(__file__).resolve().parents[1]


def quantize(*args, **kw):
    """quantize_folder with one timing round (its 7 rounds take seconds on a busy machine)."""
    return quantize_folder(*args, timing_rounds=1, **kw)


TEXT = "the quick brown fox jumps over the lazy dog. PACK MY BOX, 0123456789!"
H = 24


@pytest.fixture(scope="module")
def tok():
    return train_char_tokenizer([TEXT])


@pytest.fixture(scope="module")
def char_folder(tok, tmp_path_factory):
    """A random char NLSTM (depth 2) exported with its sequence graph."""
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(kind="char", core="nlstm", hidden_size=H, depth=2, vocab_size=tok.vocab_size)
    )
    out = tmp_path_factory.mktemp("char") / "m"
    export_model(
        model,
        out,
        task="ptb",
        tokenizer=tok.model_proto,
        sequence="always",
        metrics={"valid_bpc": 5.0, "test_bpc": 5.0},
        train_config={"batch_size": 4, "seq_len": 20},
    )
    return out


@pytest.fixture(scope="module")
def glimpse_folder(tmp_path_factory):
    """A random glimpse LSTM classifier whose weights have outliers: one large value per matrix
    stretches a per-tensor int8 scale, so its quantization visibly moves the logits."""
    torch.manual_seed(1)
    model = build_model(ModelConfig(kind="glimpse", core="lstm", hidden_size=H, num_layers=1))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
                p.view(-1)[0] = 40.0 * p.abs().max()
    out = tmp_path_factory.mktemp("glimpse") / "m"
    export_model(
        model, out, task="mnist", tokenizer=None, sequence="never", train_config={"batch_size": 50}
    )
    return out


def stream_data(tok, n=6000, seed=0) -> EvalData:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, tok.vocab_size, size=n).astype(np.uint8)
    splits = {
        s: StreamSplit(ids[i * n // 3 : (i + 1) * n // 3])
        for i, s in enumerate(("train", "valid", "test"))
    }
    return EvalData(
        "stream",
        splits,
        batch_size=4,
        seq_len=20,
        tokenizer=tok.model_proto,
        description="synthetic",
    )


def glimpse_data(folder: Path, n=600) -> EvalData:
    """Random glimpses labelled with the float32 model's own predictions: its accuracy is 100%,
    so a quantized model can only lose points (a cost >= 0 that the threshold test relies on)."""
    rng = np.random.default_rng(0)
    g = rng.random((n, 20, 49), dtype=np.float32)
    labels = load_model(folder, providers="cpu").classify(g).argmax(1).astype(np.uint8)
    split = GlimpseSplit(g, labels)
    return EvalData(
        "glimpses",
        {"train": split, "valid": split, "test": split},
        batch_size=50,
        description="synthetic",
    )


# ------------------------------------------------------------------ the exported graphs as they are
def test_exported_graphs_pass_the_checker_and_quantize_dynamic_as_they_are(char_folder, tmp_path):
    """The float32 export is taken by onnx.checker (full check) and by onnxruntime's
    quantize_dynamic without any pre-processing: before the exporter dropped the value_info of
    its weights, quantize_dynamic stopped with "Inferred shape and existing shape differ"."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in ("model.onnx", "sequence.onnx"):
        path = char_folder / name
        onnx.checker.check_model(str(path), full_check=True)
        out = tmp_path / f"q-{name}"
        quantize_dynamic(path, out, weight_type=QuantType.QInt8)
        onnx.checker.check_model(str(out), full_check=True)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q-model.onnx")).graph.node}
    assert "MatMulInteger" in ops and "Gemm" not in ops


# ------------------------------------------------------------------------------- quantize_folder
def test_int8_folder_is_measured_against_float32_and_served_as_int8(char_folder, tok, tmp_path):
    data = stream_data(tok)
    out = tmp_path / "m-int8"
    result = quantize(char_folder, out, data=data, screen_batches=3)
    meta = ExportMeta.from_folder(out)
    assert meta.precision == "int8" and not result.over_threshold
    q = meta.quantization
    assert q["settings"]["name"] in [c["name"] for c in q["candidates"]]
    assert sum(c["chosen"] for c in q["candidates"]) == 1 and len(q["candidates"]) >= 4
    assert q["source"]["files"] == ExportMeta.from_folder(char_folder).files
    # the figures are measured on the full splits, and agree with an evaluation done here
    f32 = load_model(char_folder, providers="cpu")
    int8 = load_model(out, providers="cpu")
    for split in ("valid", "test"):
        ref, ours = evaluate(f32, data, split), evaluate(int8, data, split)
        assert q["reference_figures"][f"{split}_bpc"] == pytest.approx(ref["bpc"], abs=1e-5)
        assert q["figures"][f"{split}_bpc"] == pytest.approx(ours["bpc"], abs=1e-5)
        assert meta.figures[f"{split}_bpc"] == pytest.approx(ours["bpc"], abs=1e-5)
        assert q["cost"][split] == pytest.approx(ours["bpc"] - ref["bpc"], abs=1e-5)
        assert q["reference_figures"][f"{split}_items"] == len(data.splits[split].ids) - 1
    assert abs(q["cost"]["test"]) < 0.01
    assert set(q["speed"]["speedup"]) == {"1", "64"}
    # the int8 graph holds int8 weights and is a fraction of the float32 file's size
    g = onnx.load(str(out / "model.onnx"))
    assert any(t.data_type == onnx.TensorProto.INT8 for t in g.graph.initializer)
    assert meta.files["model.onnx"] != ExportMeta.from_folder(char_folder).files["model.onnx"]
    assert not meta.sequence_graph and not int8.has_sequence_graph
    # ListModels shows the precision and the float32 figures beside the int8 ones
    info = model_info("m-int8", int8)
    assert info.precision == "int8" and info.quantization.startswith("int8 ")
    assert info.reference_metrics["test_bpc"] == pytest.approx(q["reference_figures"]["test_bpc"])
    assert info.metrics["test_bpc"] == pytest.approx(q["figures"]["test_bpc"])
    plain = model_info("m", f32)
    assert plain.precision == "float32" and not plain.reference_metrics and plain.quantization == ""


def test_batch_invariant_says_whether_a_row_depends_on_the_batch(char_folder, tok, tmp_path):
    """Dynamic int8 quantizes a MatMul's input with one scale over the whole batch, so a row's
    result depends on the rows beside it (meta.json: batch_invariant false); static int8, with
    calibrated fixed scales, computes each row alone, bit for bit as float32 does."""
    data = stream_data(tok)
    rng = np.random.default_rng(3)
    x = rng.integers(0, tok.vocab_size, size=(30, 8))
    for method, invariant in (("dynamic-per-tensor", False), ("static-per-channel", True)):
        out = tmp_path / method
        quantize(
            char_folder,
            out,
            data=data,
            method=method,
            screen_batches=2,
            thresholds=Thresholds(max_bpc_increase=10.0),
        )
        assert ExportMeta.from_folder(out).quantization["batch_invariant"] is invariant
        m = load_model(out, providers="cpu")
        alone, batch = m.initial_state(1), m.initial_state(8)
        diff = 0.0
        for t in range(len(x)):
            la, alone = m.step(x[t, :1], alone)
            lb, batch = m.step(x[t], batch)
            diff = max(diff, float(np.abs(la[0] - lb[0]).max()))
        assert (diff == 0.0) is invariant, (method, diff)


def test_a_cost_over_the_threshold_is_refused_unless_accepted(glimpse_folder, tmp_path):
    data = glimpse_data(glimpse_folder)
    out = tmp_path / "g-int8"
    with pytest.raises(QuantizationCost, match=re.escape("over the threshold of 0.0")):
        quantize(
            glimpse_folder,
            out,
            data=data,
            method="dynamic-per-tensor",
            thresholds=Thresholds(max_accuracy_drop=0.0),
        )
    assert not out.exists()
    result = quantize(
        glimpse_folder,
        out,
        data=data,
        method="dynamic-per-tensor",
        thresholds=Thresholds(max_accuracy_drop=0.0),
        accept_cost=True,
    )
    q = ExportMeta.from_folder(out).quantization
    assert result.over_threshold and q["over_threshold"] and q["cost"]["test"] > 0
    assert q["reference_figures"]["test_acc"] == 1.0
    assert q["cost_unit"] == "points of accuracy" and q["threshold"] == 0.0
    # a generous threshold takes the same graph
    quantize(
        glimpse_folder,
        tmp_path / "g2",
        data=data,
        method="dynamic-per-tensor",
        thresholds=Thresholds(max_accuracy_drop=100.0),
    )


def test_bad_requests_say_what_is_allowed(char_folder, glimpse_folder, tok, tmp_path):
    data = stream_data(tok)
    with pytest.raises(ValueError, match="precision must be one of"):
        quantize(char_folder, tmp_path / "x", data=data, precision="int4")
    with pytest.raises(ValueError, match="method must be"):
        quantize(char_folder, tmp_path / "x", data=data, method="fastest")
    with pytest.raises(ValueError, match="must differ"):
        quantize(char_folder, char_folder, data=data)
    with pytest.raises(ValueError, match="max_bpc_increase must be a finite number >= 0"):
        Thresholds(max_bpc_increase=-1)
    from training.quantize import QuantizationError

    with pytest.raises(QuantizationError, match="glimpse classifier but the data is stream"):
        quantize(glimpse_folder, tmp_path / "x", data=data)
    other = EvalData("stream", data.splits, 4, 20, train_char_tokenizer(["abc"]).model_proto)
    with pytest.raises(QuantizationError, match="tokenizer is not"):
        quantize(char_folder, tmp_path / "x", data=other)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an exported model"):
        quantize(char_folder, tmp_path / "notes", data=data)
    # an int8 folder is not quantized again
    quantize(char_folder, tmp_path / "q", data=data, method="dynamic-per-channel", screen_batches=2)
    with pytest.raises(QuantizationError, match="holds a int8 model"):
        quantize(tmp_path / "q", tmp_path / "qq", data=data)


# ----------------------------------------------------------------------------------- meta.json
def test_precision_is_in_meta_json_and_version_1_reads_as_float32(char_folder, tmp_path):
    d = json.loads((char_folder / "meta.json").read_text())
    assert d["precision"] == "float32" and d["quantization"] == {} and d["format_version"] == 2
    v1 = {k: v for k, v in d.items() if k not in ("precision", "quantization")}
    v1["format_version"] = 1
    meta = ExportMeta.from_json(json.dumps(v1))
    assert meta.precision == "float32"
    assert json.loads(meta.to_json())["format_version"] == 2  # written back as the current version
    with pytest.raises(ExportFormatError, match="unknown keys"):
        ExportMeta.from_json(json.dumps({**v1, "precision": "int8"}))
    with pytest.raises(ExportFormatError, match="precision must be one of"):
        ExportMeta.from_json(json.dumps({**d, "precision": "int4"}))
    with pytest.raises(ExportFormatError, match="quantization settings belong"):
        ExportMeta.from_json(json.dumps({**d, "precision": "int8"}))


# ------------------------------------------------------------------------------------ float16
def test_float16_graph_keeps_the_float32_signature(char_folder, tok, tmp_path):
    """The float16 route on the CPU provider (onnxruntime runs it there too, slowly): the
    graph is checked, its inputs and outputs stay float32 and its logits stay close."""
    out = tmp_path / "m-f16"
    quantize(
        char_folder,
        out,
        data=stream_data(tok),
        precision="float16",
        thresholds=Thresholds(max_bpc_increase=0.05),
    )
    meta = ExportMeta.from_folder(out)
    assert meta.precision == "float16" and meta.quantization["settings"]["name"] == "float16"
    g = onnx.load(str(out / "model.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in g.graph.initializer)
    a, b = load_model(char_folder, providers="cpu"), load_model(out, providers="cpu")
    x = np.arange(5) % meta.vocab_size
    (la, sa), (lb, sb) = a.step(x), b.step(x)
    assert sb.dtype == np.float32 and np.abs(la - lb).max() < 2e-2 and np.abs(sa - sb).max() < 2e-2


def test_float16_without_cuda_is_a_clear_error(char_folder, tmp_path, capsys):
    from training.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    code = main(
        ["quantize", str(char_folder), "--out", str(tmp_path / "x"), "--precision", "float16"]
    )
    assert code == 2 and "float16 step graphs are for the CUDA provider" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.gpu
def test_float16_folder_runs_on_cuda(char_folder, tok, tmp_path):
    out = tmp_path / "m-f16"
    quantize(
        char_folder,
        out,
        data=stream_data(tok),
        precision="float16",
        providers="cuda",
        thresholds=Thresholds(max_bpc_increase=0.05),
    )
    m = load_model(out, providers="cuda")
    assert m.device == "cuda"
    ref = load_model(char_folder, providers="cpu")
    ids = np.arange(40) % m.meta.vocab_size
    assert abs(m.score_ids(ids).bits_per_char - ref.score_ids(ids).bits_per_char) < 0.05


@pytest.mark.gpu
def test_int8_folders_run_on_the_cpu_under_auto_providers():
    """On a GPU machine "auto" puts float32 folders on CUDA but int8 ones on the CPU."""
    assert load_model(REPO / "exported" / "ptb-nlstm-int8").device == "cpu"
    assert load_model(REPO / "exported" / "ptb-nlstm").device == "cuda"


# --------------------------------------------------------------------------- commands, real data
@pytest.mark.slow
def test_nlstm_quantize_refuses_then_accepts_on_the_bundled_classifier(shared_data, tmp_path):
    out = tmp_path / "mnist-int8"
    base = [
        sys.executable,
        "-m",
        "training.cli",
        "quantize",
        str(REPO / "exported" / "mnist-nlstm"),
        "--out",
        str(out),
        "--data-dir",
        str(shared_data),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--method",
        "dynamic-per-tensor",
        "--max-accuracy-drop",
        "0",
    ]
    run = subprocess.run(base, check=False, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert run.returncode == 3, run.stderr
    assert "REFUSED" in run.stderr and "--accept-cost" in run.stderr and not out.exists()
    run = subprocess.run(
        [*base, "--accept-cost"], check=False, capture_output=True, text=True, cwd=REPO, timeout=900
    )
    assert run.returncode == 0, run.stderr
    assert "WARNING" in run.stderr and "passes the threshold" in run.stderr
    meta = ExportMeta.from_folder(out)
    assert meta.precision == "int8" and meta.quantization["over_threshold"]
    assert meta.quantization["reference_figures"]["test_items"] == 10_000


@pytest.mark.slow
def test_nlstm_export_quantize_writes_both_folders(shared_data, tmp_path):
    """`nlstm export CKPT --out OUT --quantize int8` exports OUT, then quantizes it into
    OUT-int8 in a fresh process, measured on the task's real data (a random MNIST model)."""
    from training.checkpoint import Checkpoint, save_checkpoint

    torch.manual_seed(2)
    model = build_model(ModelConfig(kind="glimpse", core="nlstm", hidden_size=8, depth=2))
    ckpt = tmp_path / "m.pt"
    save_checkpoint(
        Checkpoint(
            task="mnist",
            model_config=model.config,
            model=model.state_dict(),
            tokenizer=None,
            train_config={"batch_size": 500},
            step=1,
            epoch=1,
            metrics={"valid_acc": 0.1},
        ),
        ckpt,
    )
    out = tmp_path / "mnist-random"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.cli",
            "export",
            str(ckpt),
            "--out",
            str(out),
            "--no-sequence",
            "--quantize",
            "int8",
            "--method",
            "dynamic-per-channel",
            "--accept-cost",
            "--data-dir",
            str(shared_data),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1200,
    )
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and "mnist-random-int8" in run.stdout
    f32, int8 = ExportMeta.from_folder(out), ExportMeta.from_folder(tmp_path / "mnist-random-int8")
    assert (f32.precision, int8.precision) == ("float32", "int8")
    assert int8.quantization["source"]["files"] == f32.files
    assert int8.quantization["settings"]["name"] == "dynamic-per-channel"
    assert int8.quantization["figures"]["test_items"] == 10_000


@pytest.mark.parametrize("name", ["ptb-nlstm-int8", "mnist-nlstm-int8", "poems-nlstm-int8"])
def test_bundled_int8_models_record_their_cost_within_the_goals(name):
    """The bundled int8 folders: int8 graphs measured at quantization on the full validation
    and test splits beside their float32 source, within the issue's goals."""
    folder = REPO / "exported" / name
    meta = ExportMeta.from_folder(folder)
    source = ExportMeta.from_folder(REPO / "exported" / name.removesuffix("-int8"))
    q = meta.quantization
    assert meta.precision == "int8" and q["source"]["files"] == source.files
    assert not q["over_threshold"]
    goal = {"ptb": 0.005, "mnist": 0.2, "poems": None}[meta.task]
    if meta.task == "poems":  # +1% perplexity
        assert q["figures"]["test_ppl"] <= 1.01 * q["reference_figures"]["test_ppl"]
    else:
        assert q["cost"]["test"] <= goal
    # the full test splits: every PTB character after the first, all 10,000 MNIST test images
    items = {"ptb": 442_422, "mnist": 10_000}.get(meta.task)
    assert (
        q["reference_figures"]["test_items"]
        == q["figures"]["test_items"]
        == (items or q["figures"]["test_items"])
    )
