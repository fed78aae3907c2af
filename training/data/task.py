"""What a task module provides (`Task`), and the three shapes a prepared split can take.

Each of ptb.py, text8.py, poems.py and mnist.py defines one `Task`: its raw files, the
parameters that shape its splits (they key the cache), a `build` that turns verified raw files
into a prepared folder, and an `open` that maps that folder's arrays back into splits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.data.fetch import RawFile

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class StreamSplit:
    """A character-level language-modelling split: one id stream (PTB, text8)."""

    ids: np.ndarray  # (T,) uint8 ids, memory-mapped

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class SequenceSplit:
    """Independent sequences padded to one length (the poems): bos, characters, eos, pad..."""

    ids: np.ndarray  # (N, L) ids, padded with the tokenizer's pad_id, memory-mapped
    lengths: np.ndarray  # (N,) int32 real tokens per row, bos and eos included

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass(frozen=True)
class GlimpseSplit:
    """MNIST as glimpse sequences (serving.formats.image_to_glimpses) and their digits."""

    glimpses: np.ndarray  # (N, 20, 49) float32 in [0, 1], memory-mapped
    labels: np.ndarray  # (N,) uint8 digits 0..9

    def __len__(self) -> int:
        return len(self.labels)


Split = StreamSplit | SequenceSplit | GlimpseSplit


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "stream" | "sequences" | "glimpses": which Split type its splits are
    raw_files: tuple[RawFile, ...]
    # build(raw paths by name, empty output folder, params, progress) -> meta; the meta must hold
    # "vocab_size" (0 without a tokenizer) and "splits": {split: {counts...}}.
    build: Callable[[dict[str, Path], Path, dict, bool], dict]
    open: Callable[[Path, dict], Mapping[str, Split]]  # (prepared folder, meta) -> splits
    params: dict = field(default_factory=dict)  # split sizes, seeds, ...: part of the cache key
