"""The bundled models in exported/: they load without torch, their files match meta.json, and
they reach their recorded figures on the real test sets (skipped without the datasets)."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / "exported" / "mnist-nlstm"


def test_mnist_model_loads_without_torch_and_matches_its_hashes():
    code = ("import sys; from serving.runtime import load_model; "
            f"m = load_model({str(MNIST)!r}); print(m.meta.kind, m.meta.core, m.meta.hidden_size, "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["glimpse", "nlstm", "75", "False"]


def test_mnist_model_reaches_its_test_accuracy(shared_data):
    from serving.formats import ExportMeta, image_to_glimpses
    from serving.runtime import load_model

    model = load_model(MNIST, providers="cpu")
    with gzip.open(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:2000]
    with gzip.open(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:2000]
    acc = (model.classify(image_to_glimpses(images)).argmax(1) == labels).mean()
    meta = ExportMeta.from_folder(MNIST)
    assert meta.figures["test_acc"] >= 0.97  # the goal for the bundled classifier
    assert acc >= 0.97, acc
