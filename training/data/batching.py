"""Batches for the three kinds of task, as numpy arrays laid out sequence-first like torch.nn.LSTM.

Language-model streams (PTB, text8): the stream is cut into `batch_size` contiguous rows and each
row is read left to right in chunks of `seq_len`, so batch k+1 continues every row of batch k:
training carries the recurrent state across batches (truncated backpropagation; detach it
between batches). A target is the character after its input. Row b predicts the targets
`1 + b*r .. (b+1)*r` of the stream:

- `lm_batches` (training): r = (T - 1) // batch_size, so at most batch_size - 1 trailing targets
  are left out of an epoch; every mask is all true.
- `lm_eval_batches` (evaluation): r = ceil((T - 1) / batch_size) and the positions past the end
  are padding with mask false, so every character but the first (it has no context) is predicted
  exactly once. Report the loss as sum(nll * mask) / mask.sum().

In both, the last chunk of a row is shorter when seq_len does not divide r. `start` skips that
many batches, so a resumed run continues where it stopped.

Sequences (poems): each batch holds whole padded sequences trimmed to its longest one; inputs
drop the last position, targets the first, and the mask is false on padding. Glimpses (MNIST):
(20, B, 49) inputs and (B,) labels. Both are shuffled per epoch by a generator seeded with
(seed, epoch) when `shuffle` is on (training) and in order otherwise (evaluation covers every
item once, the last batch smaller).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np


class LMBatch(NamedTuple):
    x: np.ndarray  # (S, B) int64 input ids
    y: np.ndarray  # (S, B) int64 target ids: the next character of each input
    mask: np.ndarray  # (S, B) bool: which targets count in the loss


class GlimpseBatch(NamedTuple):
    x: np.ndarray  # (20, B, 49) float32 glimpses
    y: np.ndarray  # (B,) int64 digit labels


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")


class StreamBatches:
    """The batches of one pass over an id stream; see the module docstring for the layout."""

    def __init__(
        self, ids: np.ndarray, batch_size: int, seq_len: int, *, cover_all: bool, start: int = 0
    ):
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        ids = np.asarray(ids) if not isinstance(ids, np.ndarray) else ids
        if ids.ndim != 1:
            raise ValueError(f"an id stream must be one-dimensional; got shape {ids.shape}")
        n_targets = len(ids) - 1
        if cover_all:
            row = -(-n_targets // batch_size) if n_targets > 0 else 0  # ceil
        else:
            row = n_targets // batch_size
            if row < 1:
                raise ValueError(
                    f"a stream of {len(ids)} ids is too short for batch_size {batch_size}: "
                    "each row needs at least one target"
                )
        self.ids, self.batch_size, self.seq_len, self.row = ids, batch_size, seq_len, row
        self.n_batches = -(-row // seq_len)  # ceil
        if not 0 <= start <= self.n_batches:
            raise ValueError(f"start must be in [0, {self.n_batches}]; got {start}")
        self.start = start

    def __len__(self) -> int:
        return self.n_batches - self.start

    def __iter__(self) -> Iterator[LMBatch]:
        last = len(self.ids) - 1
        rows = np.arange(self.batch_size, dtype=np.int64) * self.row  # (B,) first input of each row
        for k in range(self.start, self.n_batches):
            t0 = k * self.seq_len
            steps = np.arange(t0, min(t0 + self.seq_len, self.row), dtype=np.int64)  # (S,)
            pos = steps[:, None] + rows[None, :]  # (S, B) input positions in the stream
            mask = pos < last  # a target exists at pos + 1
            x = self.ids[np.minimum(pos, last)].astype(np.int64)  # (S, B)
            y = self.ids[np.minimum(pos + 1, last)].astype(np.int64)  # (S, B)
            if not mask.all():  # only in evaluation: padding past the end of the stream
                x[~mask] = 0
                y[~mask] = 0
            yield LMBatch(x, y, mask)


def lm_batches(ids: np.ndarray, batch_size: int, seq_len: int, start: int = 0) -> StreamBatches:
    """Training batches of a stream: (S, B) inputs/targets continuing each row across batches."""
    return StreamBatches(ids, batch_size, seq_len, cover_all=False, start=start)


def lm_eval_batches(
    ids: np.ndarray, batch_size: int, seq_len: int, start: int = 0
) -> StreamBatches:
    """Evaluation batches: every character after the first is a target exactly once."""
    return StreamBatches(ids, batch_size, seq_len, cover_all=True, start=start)


def _order(n: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def sequence_batches(
    ids: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    start: int = 0,
) -> Iterator[LMBatch]:
    """Batches of whole padded sequences (poems): (S, B) inputs, targets and mask.

    `ids` is (N, L) with every row `bos ... eos pad...` and `lengths` (N,) its real tokens.
    Each batch is trimmed to its longest sequence: S = max(length) - 1.
    """
    _check_positive(batch_size=batch_size)
    lengths = np.asarray(lengths)
    if ids.ndim != 2 or lengths.shape != (ids.shape[0],):
        raise ValueError(
            f"ids must be (N, L) and lengths (N,); got {ids.shape} and {lengths.shape}"
        )
    if len(lengths) and (lengths.min() < 2 or lengths.max() > ids.shape[1]):
        raise ValueError(f"every sequence length must be in [2, {ids.shape[1]}]")
    order = _order(len(lengths), shuffle, seed, epoch)
    for k in range(start * batch_size, len(order), batch_size):
        idx = order[k : k + batch_size]
        n = lengths[idx].astype(np.int64)  # (B,)
        width = int(n.max())
        rows = np.asarray(ids[idx, :width], dtype=np.int64)  # (B, W)
        x = np.ascontiguousarray(rows[:, :-1].T)  # (W-1, B)
        y = np.ascontiguousarray(rows[:, 1:].T)  # (W-1, B)
        mask = np.arange(width - 1)[:, None] < (n - 1)[None, :]  # (W-1, B): real targets
        yield LMBatch(x, y, mask)


def glimpse_batches(
    glimpses: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    start: int = 0,
) -> Iterator[GlimpseBatch]:
    """Batches of glimpse sequences: x (20, B, 49) float32 and y (B,) int64."""
    _check_positive(batch_size=batch_size)
    if glimpses.ndim != 3 or labels.shape != (glimpses.shape[0],):
        raise ValueError(
            f"glimpses must be (N, 20, 49) and labels (N,); got {glimpses.shape} and {labels.shape}"
        )
    order = _order(len(labels), shuffle, seed, epoch)
    for k in range(start * batch_size, len(order), batch_size):
        idx = order[k : k + batch_size]
        x = np.asarray(glimpses[idx], dtype=np.float32).transpose(1, 0, 2)  # (20, B, 49)
        yield GlimpseBatch(np.ascontiguousarray(x), np.asarray(labels[idx], dtype=np.int64))


def num_batches(n_items: int, batch_size: int) -> int:
    """Batches per pass of `sequence_batches` / `glimpse_batches` over n_items."""
    _check_positive(batch_size=batch_size)
    return -(-n_items // batch_size)
