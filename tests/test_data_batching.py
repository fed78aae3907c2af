"""Batching: stream rows continue across batches, evaluation predicts each character once,
resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.data import (
    glimpse_batches,
    lm_batches,
    lm_eval_batches,
    num_batches,
    sequence_batches,
)


def test_training_batches_are_sequence_first_and_continue_each_row():
    ids = np.arange(1, 42, dtype=np.uint8)  # T = 41 -> 40 targets, B = 4 rows of r = 10
    batches = list(lm_batches(ids, batch_size=4, seq_len=3))
    assert len(batches) == 4 and [b.x.shape for b in batches] == [(3, 4)] * 3 + [(1, 4)]
    x = np.concatenate([b.x for b in batches])  # (10, 4): each column is one contiguous row
    y = np.concatenate([b.y for b in batches])
    assert x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 0], np.arange(1, 11))
    np.testing.assert_array_equal(x[:, 3], np.arange(31, 41))
    np.testing.assert_array_equal(y, x + 1)  # the target is the next character
    assert all(b.mask.all() for b in batches)
    # Batch k+1 starts where batch k stopped, in every row (the state can be carried over).
    np.testing.assert_array_equal(batches[1].x[0], batches[0].x[-1] + 1)


def test_training_drops_fewer_than_batch_size_trailing_targets():
    ids = np.arange(43)  # 42 targets, B = 4 -> rows of 10, 2 targets left out
    targets = np.concatenate([b.y[b.mask] for b in lm_batches(ids, 4, 7)])
    assert len(targets) == 40 and len(np.unique(targets)) == 40


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=300),
    batch_size=st.integers(min_value=1, max_value=17),
    seq_len=st.integers(min_value=1, max_value=23),
)
def test_evaluation_predicts_every_character_exactly_once(n, batch_size, seq_len):
    ids = np.arange(n, dtype=np.int64)  # position-coded stream: id == position
    batches = list(lm_eval_batches(ids, batch_size, seq_len))
    assert len(batches) == len(lm_eval_batches(ids, batch_size, seq_len))
    predicted = np.concatenate([b.y[b.mask] for b in batches])
    np.testing.assert_array_equal(np.sort(predicted), np.arange(1, n))  # once each, none missing
    for b in batches:
        assert b.x.shape == b.y.shape == b.mask.shape and b.x.shape[1] == batch_size
        np.testing.assert_array_equal(b.y[b.mask], b.x[b.mask] + 1)
    # Rows still continue across batches: where both are real, row b's next input follows on.
    for prev, nxt in itertools.pairwise(batches):
        both = prev.mask[-1] & nxt.mask[0]
        np.testing.assert_array_equal(nxt.x[0][both], prev.x[-1][both] + 1)


def test_start_resumes_where_a_run_stopped():
    ids = np.random.default_rng(0).integers(0, 50, size=1001)
    full = list(lm_batches(ids, 8, 10))
    resumed = lm_batches(ids, 8, 10, start=7)
    assert len(resumed) == len(full) - 7
    for a, b in zip(full[7:], resumed, strict=True):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
    with pytest.raises(ValueError, match=r"start must be in \[0, 13\]"):
        lm_batches(ids, 8, 10, start=14)


def test_stream_batching_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match="batch_size must be a positive integer; got 0"):
        lm_batches(np.arange(10), 0, 5)
    with pytest.raises(ValueError, match="too short for batch_size 20"):
        lm_batches(np.arange(10), 20, 5)
    with pytest.raises(ValueError, match="one-dimensional"):
        lm_batches(np.zeros((3, 3)), 1, 1)


def test_works_on_a_memory_map(tmp_path):
    ids = np.arange(1000, dtype=np.uint8) % 51
    np.save(tmp_path / "a.npy", ids)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    for a, b in zip(lm_eval_batches(mm, 7, 13), lm_eval_batches(ids, 7, 13), strict=True):
        np.testing.assert_array_equal(a.x, b.x)


# ------------------------------------------------------------------------------------- poems
PAD, BOS, EOS = 3, 1, 2


def padded(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(s) for s in seqs) + 2
    ids = np.full((len(seqs), width), PAD, dtype=np.uint16)
    for i, s in enumerate(seqs):
        ids[i, : len(s) + 2] = [BOS, *s, EOS]
    return ids, np.array([len(s) + 2 for s in seqs], dtype=np.int32)


def test_sequence_batches_mask_padding_and_keep_end_marker():
    ids, lengths = padded([[10, 11, 12], [20], [30, 31], [40, 41, 42, 43], [50]])
    batches = list(sequence_batches(ids, lengths, batch_size=2))
    assert len(batches) == num_batches(5, 2) == 3
    b = batches[0]  # sequences 0 and 1, width trimmed to the longest (5 tokens -> 4 steps)
    assert b.x.shape == (4, 2)
    np.testing.assert_array_equal(b.x[:, 0], [BOS, 10, 11, 12])
    np.testing.assert_array_equal(b.y[:, 0], [10, 11, 12, EOS])
    np.testing.assert_array_equal(b.mask[:, 1], [True, True, False, False])  # "20", eos, pad, pad
    assert batches[2].x.shape == (2, 1)  # the last, smaller batch
    targets = sum(int(b.mask.sum()) for b in batches)
    assert targets == int((lengths - 1).sum())  # every character and end marker, once
    assert all((b.y[~b.mask] == PAD).all() for b in batches)


def test_sequence_batches_shuffle_is_seeded_and_covers_everything():
    ids, lengths = padded([[i] * (1 + i % 4) for i in range(10, 40)])

    def firsts(**kw):
        return np.concatenate([b.y[0] for b in sequence_batches(ids, lengths, 4, **kw)])

    plain = firsts()
    a, b, c = (
        firsts(shuffle=True, seed=1, epoch=0),
        firsts(shuffle=True, seed=1, epoch=0),
        firsts(shuffle=True, seed=1, epoch=1),
    )
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, plain)
    assert sorted(a) == sorted(plain) == list(range(10, 40))
    resumed = np.concatenate(
        [b.y[0] for b in sequence_batches(ids, lengths, 4, shuffle=True, seed=1, epoch=1, start=2)]
    )
    np.testing.assert_array_equal(resumed, c[8:])


# ------------------------------------------------------------------------------------- mnist
def test_glimpse_batches_layout_and_shuffle():
    n = 10
    g = np.arange(n * 20 * 49, dtype=np.float32).reshape(n, 20, 49)
    labels = (np.arange(n) % 10).astype(np.uint8)
    batches = list(glimpse_batches(g, labels, 4))
    assert [b.x.shape for b in batches] == [(20, 4, 49), (20, 4, 49), (20, 2, 49)]
    assert batches[0].x.dtype == np.float32 and batches[0].y.dtype == np.int64
    np.testing.assert_array_equal(batches[0].x[:, 1], g[1])  # column b is image b's sequence
    shuffled = list(glimpse_batches(g, labels, 4, shuffle=True, seed=3, epoch=2))
    seen = np.concatenate([b.y for b in shuffled])
    assert sorted(seen) == sorted(labels) and not np.array_equal(seen, labels)
    for b in shuffled:  # images stay with their labels
        for j, label in enumerate(b.y):
            np.testing.assert_array_equal(b.x[:, j], g[label])
