"""MNIST glimpses: the IDX files turned into (N, 20, 49) glimpse sequences and uint8 labels.

The glimpse layout is `serving.formats.image_to_glimpses` (the server's wire format). Splits:
train is the first 55,000 training images, valid the last 5,000 (a fixed rule, no shuffling),
test the standard 10,000.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from tqdm import tqdm

from serving.formats import GLIMPSE_SIZE, GLIMPSES_PER_IMAGE, IMAGE_SIDE, image_to_glimpses
from training.data import cache
from training.data.fetch import ChecksumError, RawFile
from training.data.task import SPLITS, GlimpseSplit, Task

MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's mirror of LeCun's files
RAW_FILES = (
    RawFile(
        "train-images-idx3-ubyte.gz",
        MIRROR + "train-images-idx3-ubyte.gz",
        sha256="440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        size=9_912_422,
    ),
    RawFile(
        "train-labels-idx1-ubyte.gz",
        MIRROR + "train-labels-idx1-ubyte.gz",
        sha256="3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        size=28_881,
    ),
    RawFile(
        "t10k-images-idx3-ubyte.gz",
        MIRROR + "t10k-images-idx3-ubyte.gz",
        sha256="8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        size=1_648_877,
    ),
    RawFile(
        "t10k-labels-idx1-ubyte.gz",
        MIRROR + "t10k-labels-idx1-ubyte.gz",
        sha256="f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        size=4_542,
    ),
)
VALID_IMAGES = 5_000  # the last 5,000 training images
NUM_CLASSES = 10
_BLOCK = 10_000  # images per glimpse computation (bounds temporary memory)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip'd): images (N, 28, 28) uint8 (magic 2051) or labels (N,) uint8 (2049)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic == 2051:
        n, rows, cols = (int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
        if (rows, cols) != (IMAGE_SIDE, IMAGE_SIDE) or len(data) != 16 + n * rows * cols:
            raise ChecksumError(f"{path}: malformed IDX image file")
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)
    if magic == 2049:
        n = int.from_bytes(data[4:8], "big")
        if len(data) != 8 + n:
            raise ChecksumError(f"{path}: malformed IDX label file")
        return np.frombuffer(data, dtype=np.uint8, offset=8)
    raise ChecksumError(f"{path}: not an IDX file (magic {magic}; expected 2051 or 2049)")


def build(raw: dict[str, Path], out: Path, params: dict, progress: bool) -> dict:
    train_x = read_idx(raw["train-images-idx3-ubyte.gz"])
    train_y = read_idx(raw["train-labels-idx1-ubyte.gz"])
    test_x = read_idx(raw["t10k-images-idx3-ubyte.gz"])
    test_y = read_idx(raw["t10k-labels-idx1-ubyte.gz"])
    n_valid = params["valid_images"]
    images = {"train": train_x[:-n_valid], "valid": train_x[-n_valid:], "test": test_x}
    labels = {"train": train_y[:-n_valid], "valid": train_y[-n_valid:], "test": test_y}
    splits = {}
    with tqdm(
        total=len(train_x) + len(test_x), desc="mnist glimpses", unit="img", disable=not progress
    ) as bar:
        for split in SPLITS:
            x = images[split]
            g = cache.new_array(
                out, f"{split}_glimpses", (len(x), GLIMPSES_PER_IMAGE, GLIMPSE_SIZE), np.float32
            )
            for i in range(0, len(x), _BLOCK):
                g[i : i + _BLOCK] = image_to_glimpses(x[i : i + _BLOCK])  # (n, 20, 49)
                bar.update(len(x[i : i + _BLOCK]))
            g.flush()
            cache.save_array(out, f"{split}_labels", labels[split])
            splits[split] = {"images": len(x)}
    return {"vocab_size": 0, "tokenizer": None, "num_classes": NUM_CLASSES, "splits": splits}


def open_splits(folder: Path, meta: dict) -> dict[str, GlimpseSplit]:
    return {
        split: GlimpseSplit(
            cache.open_array(folder, f"{split}_glimpses"),
            cache.open_array(folder, f"{split}_labels"),
        )
        for split in SPLITS
    }


TASK = Task(
    name="mnist",
    kind="glimpses",
    raw_files=RAW_FILES,
    build=build,
    open=open_splits,
    params={"valid_images": VALID_IMAGES},
)
