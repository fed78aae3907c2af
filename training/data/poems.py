"""Chinese poems: 5-character quatrains (SeqGAN's "Poem" set), one padded sequence per poem.

Raw file: `shi.txt` from geek-ai/Texygen (pinned commit), 16,394 lines, one quatrain per line,
every token followed by a space. Each line becomes natural text (the separator spaces dropped):
20 Han characters and 4 punctuation marks.

Split (the paper's own split is not public): exact duplicate lines are dropped first, keeping
the first occurrence, so no poem sits in two splits; then the distinct poems are ordered by
sha256(SEED + poem) -- a seeded shuffle that no library version can change -- and the first 90%
train, the next 5% validate, the last 5% test (counts rounded down for valid and test). Within
a split, poems keep their order in the file.

Each poem is one sequence `<s> c1 ... c24 </s>`, padded with `<pad>` to the longest poem; the
batcher masks padding out of the loss. The tokenizer is trained on the training poems only, so
a character seen only in valid or test becomes the unknown id (counted in meta.json).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from training.data import cache
from training.data.fetch import RawFile
from training.data.task import SPLITS, SequenceSplit, Task
from training.data.tokenizer import id_dtype, train_char_tokenizer

URL = (
    "https://raw.githubusercontent.com/geek-ai/Texygen/"
    "3104e22ac75f3cc2070da2bf5e2da6d2bef149ad/data/shi.txt"
)
RAW_FILES = (
    RawFile(
        "shi.txt",
        URL,
        sha256="ac03c5fbb07776f0e43cb1ccfc74732f5313ab3d832df81c8e0db327df35e666",
        size=1_590_217,
    ),
)
SEED = "nlstm-poems-2018"
FRACTIONS = {"valid": 0.05, "test": 0.05}  # the rest trains


def read_poems(text: str) -> list[str]:
    """One poem per non-empty line, separator spaces removed: "秦 川 雄 " -> "秦川雄"."""
    poems = []
    for n, line in enumerate(text.split("\n"), 1):
        tokens = line.split()
        if not tokens:
            continue
        if any(len(t) != 1 for t in tokens):
            raise ValueError(
                f"poems line {n}: tokens must be single characters separated by spaces"
            )
        poems.append("".join(tokens))
    return poems


def dedupe(poems: list[str]) -> list[str]:
    """Drop exact duplicates, keeping the first occurrence (order preserved)."""
    return list(dict.fromkeys(poems))


def split_poems(
    poems: list[str], seed: str = SEED, fractions: dict = FRACTIONS
) -> dict[str, list[str]]:
    """The seeded, library-independent split described in the module docstring."""
    n = len(poems)
    n_valid, n_test = int(n * fractions["valid"]), int(n * fractions["test"])
    rank = sorted(range(n), key=lambda i: hashlib.sha256((seed + poems[i]).encode()).digest())
    parts = {
        "train": rank[: n - n_valid - n_test],
        "valid": rank[n - n_valid - n_test : n - n_test],
        "test": rank[n - n_test :],
    }
    return {split: [poems[i] for i in sorted(idx)] for split, idx in parts.items()}


def build(raw: dict[str, Path], out: Path, params: dict, progress: bool) -> dict:
    lines = read_poems(raw["shi.txt"].read_text(encoding="utf-8"))
    poems = dedupe(lines)
    split = split_poems(poems, params["seed"], params["fractions"])
    tok = train_char_tokenizer(split["train"], markers=True)
    (out / "tokenizer.model").write_bytes(tok.model_proto)
    width = max(len(p) for p in poems) + 2  # bos + characters + eos
    splits = {}
    for name, items in split.items():
        ids = np.full((len(items), width), tok.pad_id, dtype=id_dtype(tok.vocab_size))  # (N, L)
        lengths = np.empty(len(items), dtype=np.int32)  # (N,)
        unknown = 0
        for i, poem in enumerate(items):
            enc = tok.encode(poem)
            ids[i, 0] = tok.bos_id
            ids[i, 1 : 1 + len(enc.ids)] = enc.ids
            ids[i, 1 + len(enc.ids)] = tok.eos_id
            lengths[i] = len(enc.ids) + 2
            unknown += enc.unknown_chars
        cache.save_array(out, f"{name}_ids", ids)
        cache.save_array(out, f"{name}_lengths", lengths)
        splits[name] = {
            "poems": len(items),
            "chars": int(lengths.sum()) - 2 * len(items),
            "unknown_chars": unknown,
        }
    return {
        "vocab_size": tok.vocab_size,
        "tokenizer": "tokenizer.model",
        "symbols": tok.vocab_size - 4,  # distinct training characters (not unk, bos, eos, pad)
        "lines": len(lines),
        "duplicates_dropped": len(lines) - len(poems),
        "splits": splits,
    }


def open_splits(folder: Path, meta: dict) -> dict[str, SequenceSplit]:
    return {
        split: SequenceSplit(
            cache.open_array(folder, f"{split}_ids"), cache.open_array(folder, f"{split}_lengths")
        )
        for split in SPLITS
    }


TASK = Task(
    name="poems",
    kind="sequences",
    raw_files=RAW_FILES,
    build=build,
    open=open_splits,
    params={"seed": SEED, "fractions": FRACTIONS},
)
