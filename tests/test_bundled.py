"""The bundled models in exported/: they load without torch, their files match meta.json, and
they reach their recorded figures on the real test sets (skipped without the datasets): the
exported graphs, run by serving.runtime over the trainer's own evaluation batches, give the test
figure the trainer recorded at the best validation."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

MNIST = REPO / "exported" / "mnist-nlstm"
PTB = REPO / "exported" / "ptb-nlstm"
POEMS = REPO / "exported" / "poems-nlstm"
INT8 = {m: m.with_name(f"{m.name}-int8") for m in (MNIST, PTB, POEMS)}  # quantized beside them
BUNDLED_LIMIT = 30 * 2**20  # the budget for all bundled models together


@pytest.mark.parametrize(
    "folder, expect",
    [
        (MNIST, ["glimpse", "nlstm", "75", "2", "False"]),
        (PTB, ["char", "nlstm", "600", "2", "False"]),
        (POEMS, ["char", "nlstm", "32", "2", "False"]),
        (INT8[MNIST], ["glimpse", "nlstm", "75", "2", "False"]),
        (INT8[PTB], ["char", "nlstm", "600", "2", "False"]),
        (INT8[POEMS], ["char", "nlstm", "32", "2", "False"]),
    ],
    ids=["mnist", "ptb", "poems", "mnist-int8", "ptb-int8", "poems-int8"],
)
def test_bundled_models_load_without_torch_and_match_their_hashes(folder, expect):
    code = (
        "import sys; from serving.runtime import load_model; "
        f"m = load_model({str(folder)!r}); print(m.meta.kind, m.meta.core, m.meta.hidden_size, "
        "m.meta.depth, 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.split() == expect


def test_bundled_models_fit_their_budget():
    total = sum(p.stat().st_size for p in (REPO / "exported").rglob("*") if p.is_file())
    assert total <= BUNDLED_LIMIT, f"exported/ holds {total / 2**20:.1f} MiB"


def _exported_figure(folder: Path, task: str, shared_data, tmp_path) -> tuple[float, float]:
    """(the test figure the exported graph gives over the trainer's evaluation batches, the one
    meta.json records)."""
    import math

    from serving.formats import ExportMeta
    from serving.runtime import load_model
    from serving.sampling import log_softmax
    from training import data

    meta = ExportMeta.from_folder(folder)
    model = load_model(folder, providers="cpu")
    split = data.load(task, data_dir=shared_data, cache_dir=tmp_path).splits["test"]
    batch = meta.train_config["batch_size"]
    if task == "ptb":
        batches, carry = data.lm_eval_batches(split.ids, batch, meta.train_config["seq_len"]), True
    else:
        batches, carry = data.sequence_batches(split.ids, split.lengths, batch), False
    nats, count, state = 0.0, 0, None
    for b in batches:
        logits, final = model.run(b.x, state if carry else None)  # (S, B, V)
        lp = log_softmax(logits)
        picked = np.take_along_axis(lp, b.y[..., None], axis=-1)[..., 0]
        nats -= float(picked[b.mask].sum())
        count += int(b.mask.sum())
        state = final
    mean = nats / count
    ours = mean / math.log(2) if task == "ptb" else math.exp(mean)
    return ours, meta.figures[f"test_{'bpc' if task == 'ptb' else 'ppl'}"]


@pytest.mark.long  # the whole PTB test set through the 4.5M-parameter model, twice: minutes
@pytest.mark.parametrize("folder", [PTB, INT8[PTB]], ids=["float32", "int8"])
def test_ptb_model_reaches_its_recorded_test_bpc(folder, shared_data, tmp_path):
    ours, recorded = _exported_figure(folder, "ptb", shared_data, tmp_path)
    assert ours == pytest.approx(recorded, abs=1e-4)
    assert recorded <= 1.50  # the goal for the bundled PTB model


@pytest.mark.parametrize("folder", [POEMS, INT8[POEMS]], ids=["float32", "int8"])
def test_poems_model_reaches_its_recorded_test_perplexity(folder, shared_data, tmp_path):
    ours, recorded = _exported_figure(folder, "poems", shared_data, tmp_path)
    assert ours == pytest.approx(recorded, rel=1e-4)
    assert recorded < 625.9 / 2  # the corpus's unigram perplexity (docs/results.md)


@pytest.mark.parametrize("folder", [MNIST, INT8[MNIST]], ids=["float32", "int8"])
def test_mnist_model_reaches_its_test_accuracy(folder, shared_data):
    from serving.formats import ExportMeta, image_to_glimpses
    from serving.runtime import load_model

    model = load_model(folder, providers="cpu")
    with gzip.open(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:2000]
    with gzip.open(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:2000]
    acc = (model.classify(image_to_glimpses(images)).argmax(1) == labels).mean()
    meta = ExportMeta.from_folder(folder)
    assert meta.figures["test_acc"] >= 0.97  # the goal for the bundled classifier
    assert acc >= 0.97, acc
