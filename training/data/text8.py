"""text8: the first 10^8 characters of cleaned enwik9, split 90M / 5M / 5M into id streams.

Raw file: `text8.zip` from Matt Mahoney's site, member `text8`. No sha256 of it is published
anywhere we could check, so none is invented: the zip is verified by its well-known size
(31,344,016 bytes, the size TensorFlow's word2vec tutorial checks), the member's size
(100,000,000 bytes) and CRC-32 (zipfile checks it while reading), its alphabet (exactly the 26
lowercase letters and the space) and its known opening words. The sha256 actually found is
recorded in the prepared folder's meta.json.

The split is Mikolov et al. (2012)'s and the paper's: the first 90M characters train, the next
5M validate, the last 5M test. The text is one line with no newline, so the tokenizer is trained
on it in chunks (a char model only counts characters; chunk borders change nothing).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from training.data import cache
from training.data.fetch import ChecksumError, RawFile
from training.data.task import SPLITS, StreamSplit, Task
from training.data.tokenizer import (
    MAX_SENTENCE_CHARS,
    encode_stream,
    id_dtype,
    train_char_tokenizer,
)

URL = "http://mattmahoney.net/dc/text8.zip"
ZIP_NAME = "text8.zip"
ZIP_SIZE = 31_344_016
MEMBER = "text8"
TOTAL_CHARS = 100_000_000
SPLIT_CHARS = {"train": 90_000_000, "valid": 5_000_000, "test": 5_000_000}
PREFIX = " anarchism originated as a term of abuse"
ALPHABET = frozenset(b"abcdefghijklmnopqrstuvwxyz ")
_ENCODE_CHUNK = 1 << 22  # characters per sentencepiece call while encoding


def check_zip(path: Path, member: str = MEMBER, total_chars: int = TOTAL_CHARS) -> None:
    """Cheap structural check of a text8 zip (the full content check happens in `read_text8`)."""
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(member)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ChecksumError(f"{path} is not a text8 zip with a member {member!r} ({exc})") from None
    if info.file_size != total_chars:
        raise ChecksumError(
            f"{path}: member {member!r} has {info.file_size:,} bytes; text8 has {total_chars:,}"
        )


def raw_file(
    url: str = URL, size: int | None = ZIP_SIZE, total_chars: int = TOTAL_CHARS
) -> RawFile:
    """The text8 raw-file spec (parametrized so tests can serve a small text8-format zip)."""
    return RawFile(ZIP_NAME, url, size=size, check=lambda p: check_zip(p, MEMBER, total_chars))


def read_text8(path: Path, total_chars: int = TOTAL_CHARS, prefix: str = PREFIX) -> bytes:
    """The member `text8` of the zip at `path`, verified: length, CRC, alphabet, opening words."""
    check_zip(path, MEMBER, total_chars)
    try:
        with zipfile.ZipFile(path) as zf:
            data = zf.read(MEMBER)  # raises BadZipFile on a CRC mismatch
    except zipfile.BadZipFile as exc:
        raise ChecksumError(f"{path}: {exc}") from None
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    present = {int(b) for b in np.flatnonzero(counts)}
    if present != set(ALPHABET):
        extra = sorted(chr(b) for b in present - ALPHABET)
        lacking = sorted(chr(b) for b in ALPHABET - present)
        raise ChecksumError(
            f"{path}: text8 must use exactly a-z and space; unexpected {extra[:10]}, "
            f"missing {lacking[:10]}"
        )
    if not data.startswith(prefix.encode()):
        raise ChecksumError(f"{path}: text8 must start with {prefix!r}; got {data[:40]!r}")
    return data


def split_text8(data: bytes, split_chars: dict[str, int] = SPLIT_CHARS) -> dict[str, str]:
    """Consecutive train / valid / test slices of the given sizes, which must add up to the data."""
    if sum(split_chars.values()) != len(data):
        raise ValueError(
            f"text8 splits {split_chars} add up to {sum(split_chars.values()):,} characters; "
            f"the text has {len(data):,}"
        )
    out, pos = {}, 0
    for split in SPLITS:
        out[split] = data[pos : pos + split_chars[split]].decode("ascii")
        pos += split_chars[split]
    return out


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def build(raw: dict[str, Path], out: Path, params: dict, progress: bool) -> dict:
    data = read_text8(raw[ZIP_NAME], params["total_chars"], params["prefix"])
    texts = split_text8(data, params["split_chars"])
    del data
    tok = train_char_tokenizer(_chunks(texts["train"], MAX_SENTENCE_CHARS))
    (out / "tokenizer.model").write_bytes(tok.model_proto)
    splits = {}
    for split, text in texts.items():
        ids = cache.new_array(out, split, (len(text),), id_dtype(tok.vocab_size))
        _, unknown = encode_stream(
            tok,
            _chunks(text, _ENCODE_CHUNK),
            len(text),
            ids,
            desc=f"text8 {split}",
            progress=progress,
        )
        ids.flush()
        splits[split] = {"chars": len(text), "unknown_chars": unknown}
    return {
        "vocab_size": tok.vocab_size,
        "tokenizer": "tokenizer.model",
        "symbols": tok.vocab_size - 1,
        "splits": splits,
    }


def open_splits(folder: Path, meta: dict) -> dict[str, StreamSplit]:
    return {split: StreamSplit(cache.open_array(folder, split)) for split in SPLITS}


def make_task(
    url: str = URL,
    zip_size: int | None = ZIP_SIZE,
    total_chars: int = TOTAL_CHARS,
    split_chars: dict[str, int] = SPLIT_CHARS,
    prefix: str = PREFIX,
) -> Task:
    """The text8 task; the defaults are the real data (tests build a small text8-format one)."""
    return Task(
        name="text8",
        kind="stream",
        raw_files=(raw_file(url, zip_size, total_chars),),
        build=build,
        open=open_splits,
        params={"total_chars": total_chars, "split_chars": dict(split_chars), "prefix": prefix},
    )


TASK = make_task()
