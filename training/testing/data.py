"""Small synthetic datasets shaped like training.data's prepared tasks, for the trainer's tests
(and bench/gpu_check.py's smoke stage).

Each helper returns a `training.data.Prepared` that `training.trainer.train(..., prepared=...)`
accepts in place of `training.data.load(task)`: a character stream (like PTB), padded
sequences (like the poems) and glimpse sequences (like MNIST), all learnable and tiny.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data import GlimpseSplit, Prepared, SequenceSplit, StreamSplit
from training.data.tokenizer import train_char_tokenizer

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "its", "bed"]


def synthetic_text(n_chars: int, seed: int) -> str:
    """Sentences of a tiny grammar: learnable structure, a handful of symbols."""
    rng = np.random.default_rng(seed)
    out, size = [], 0
    while size < n_chars:
        sent = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 8)))) + "\n"
        out.append(sent)
        size += len(sent)
    return "".join(out)[:n_chars]


def stream_prepared(
    folder: Path, n_train: int = 20_000, n_eval: int = 3_000, task: str = "ptb"
) -> Prepared:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    texts = {
        "train": synthetic_text(n_train, 0),
        "valid": synthetic_text(n_eval, 1),
        "test": synthetic_text(n_eval, 2),
    }
    tok = train_char_tokenizer(texts["train"].split("\n"), newline=True)
    (folder / "tokenizer.model").write_bytes(tok.model_proto)
    splits = {s: StreamSplit(tok.encode(t).ids.astype(np.uint8)) for s, t in texts.items()}
    return Prepared(
        task, "stream", folder, {}, tok.vocab_size, None, folder / "tokenizer.model", splits
    )


def sequences_prepared(folder: Path, n_train: int = 300, n_eval: int = 40) -> Prepared:
    """Poem-like rows `<s> c1 .. c8 </s>` (some shorter, padded): 5-letter words repeated."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["".join(rng.choice(list("abcdefgh"), size=4)) for _ in range(50)]
    tok = train_char_tokenizer(lines, markers=True)
    (folder / "tokenizer.model").write_bytes(tok.model_proto)

    def split(n, seed):
        r = np.random.default_rng(seed)
        ids = np.full((n, 10), tok.pad_id, dtype=np.uint16)
        lengths = np.empty(n, dtype=np.int32)
        for i in range(n):
            word = lines[int(r.integers(len(lines)))]
            text = word + word if r.random() < 0.7 else word  # 8 or 4 characters
            row = [tok.bos_id, *tok.encode(text).ids.tolist(), tok.eos_id]
            ids[i, : len(row)] = row
            lengths[i] = len(row)
        return SequenceSplit(ids, lengths)

    splits = {"train": split(n_train, 1), "valid": split(n_eval, 2), "test": split(n_eval, 3)}
    return Prepared(
        "poems", "sequences", folder, {}, tok.vocab_size, None, folder / "tokenizer.model", splits
    )


def glimpses_prepared(folder: Path, n_train: int = 256, n_eval: int = 64) -> Prepared:
    """Random glimpses in [0, 0.5) whose label is the index of a pixel lit (+1) in every glimpse."""

    def split(n, seed):
        r = np.random.default_rng(seed)
        g = r.random((n, 20, 49), dtype=np.float32) * 0.5
        labels = r.integers(0, 10, size=n).astype(np.uint8)
        g[np.arange(n), :, labels] += 1.0
        return GlimpseSplit(g, labels)

    splits = {"train": split(n_train, 1), "valid": split(n_eval, 2), "test": split(n_eval, 3)}
    return Prepared("mnist", "glimpses", Path(folder), {}, 0, 10, None, splits)
