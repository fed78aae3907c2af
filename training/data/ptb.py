"""Penn Treebank, character level: Mikolov's `ptb.char.{train,valid,test}.txt` as id streams.

The char files write every character followed by one space, `_` for a word space, and a
newline (itself followed by a space) at the end of each sentence. They become natural text:
separator spaces dropped, `_` -> " ", newlines kept. That is what a client sends and what the
tokenizer sees, so the 50 symbols of the paper are the 48 printable characters, the space and
the newline; the tokenizer adds its unknown id (51 ids in all).
"""

from __future__ import annotations

from pathlib import Path

from training.data import cache
from training.data.fetch import RawFile
from training.data.task import SPLITS, StreamSplit, Task
from training.data.tokenizer import encode_stream, id_dtype, train_char_tokenizer

ARCHIVE_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
RAW_FILES = (
    RawFile(
        "ptb.char.train.txt",
        ARCHIVE_URL,
        sha256="e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9",
        size=10_034_964,
        member="simple-examples/data/ptb.char.train.txt",
    ),
    RawFile(
        "ptb.char.valid.txt",
        ARCHIVE_URL,
        sha256="21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8",
        size=786_084,
        member="simple-examples/data/ptb.char.valid.txt",
    ),
    RawFile(
        "ptb.char.test.txt",
        ARCHIVE_URL,
        sha256="1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe",
        size=884_846,
        member="simple-examples/data/ptb.char.test.txt",
    ),
)


def char_file_to_text(raw: str, name: str = "ptb char file") -> str:
    """Undo the char-file spelling: "a b _ c \\n d " -> "ab c\\nd".

    Every character is followed by exactly one space, so the characters are raw[0::2] and
    raw[1::2] must be all spaces; anything else is not a PTB char file.
    """
    chars, seps = raw[0::2], raw[1::2]
    if len(raw) % 2 or seps.strip(" "):
        raise ValueError(
            f"{name} is not in the ptb.char format (each character followed by one space)"
        )
    if " " in chars:
        raise ValueError(f"{name} has a bare space where a character should be")
    return chars.replace("_", " ")


def build(raw: dict[str, Path], out: Path, params: dict, progress: bool) -> dict:
    texts = {
        split: char_file_to_text(raw[f"ptb.char.{split}.txt"].read_text(encoding="utf-8"), split)
        for split in SPLITS
    }
    # sentencepiece reads lines; the newline itself is a user-defined symbol.
    tok = train_char_tokenizer(texts["train"].split("\n"), newline=True)
    (out / "tokenizer.model").write_bytes(tok.model_proto)
    splits = {}
    for split, text in texts.items():
        ids = cache.new_array(out, split, (len(text),), id_dtype(tok.vocab_size))
        _, unknown = encode_stream(
            tok, [text], len(text), ids, desc=f"ptb {split}", progress=progress
        )
        ids.flush()
        splits[split] = {"chars": len(text), "lines": text.count("\n"), "unknown_chars": unknown}
    return {
        "vocab_size": tok.vocab_size,
        "tokenizer": "tokenizer.model",
        "symbols": tok.vocab_size - 1,  # every id but the unknown one
        "splits": splits,
    }


def open_splits(folder: Path, meta: dict) -> dict[str, StreamSplit]:
    return {split: StreamSplit(cache.open_array(folder, split)) for split in SPLITS}


TASK = Task(name="ptb", kind="stream", raw_files=RAW_FILES, build=build, open=open_splits)
