"""text8 on a small text8-format sample this test writes: download, verification, split, tokenizer.

No copy of the real text8 exists on the development machines, so the real downloader and
splitter run here with sizes scaled down; test_real_config pins the real sizes and source.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from training import data
from training.data import text8
from training.data.fetch import ChecksumError

N_CHARS = 20_000
SPLIT = {"train": 18_000, "valid": 1_000, "test": 1_000}


def sample_text(n: int = N_CHARS, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    words = [text8.PREFIX.encode(), b" the quick brown fox jumps over the lazy dog"]
    size = sum(len(w) for w in words)
    while size < n:
        w = b" " + letters[rng.integers(0, 26, size=rng.integers(1, 10))].tobytes()
        words.append(w)
        size += len(w)
    return b"".join(words)[:n]


def zipped(text: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("text8", text)
    return buf.getvalue()


def small_task(tmp_path, text: bytes, zip_size: int | None = None):
    blob = zipped(text)
    src = tmp_path / "server" / "text8.zip"
    src.parent.mkdir(exist_ok=True)
    src.write_bytes(blob)
    return text8.make_task(
        url=src.as_uri(),
        zip_size=len(blob) if zip_size is None else zip_size,
        total_chars=len(text),
        split_chars=SPLIT,
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text8")
    text = sample_text()
    task = small_task(tmp, text)
    summary = data.prepare(task, data_dir=tmp / "raw", cache_dir=tmp / "cache")
    return tmp, text, task, summary


def test_real_config():
    assert text8.TASK.params["split_chars"] == {
        "train": 90_000_000,
        "valid": 5_000_000,
        "test": 5_000_000,
    }
    assert text8.TASK.params["total_chars"] == 100_000_000
    (raw,) = text8.TASK.raw_files
    assert (raw.name, raw.url, raw.size, raw.sha256) == (
        "text8.zip",
        "http://mattmahoney.net/dc/text8.zip",
        31_344_016,
        None,
    )


def test_downloads_splits_and_counts(prepared):
    tmp, _, _, summary = prepared
    served = (tmp / "server" / "text8.zip").read_bytes()
    assert (tmp / "raw" / "text8" / "text8.zip").read_bytes() == served
    assert not summary.cached
    counts = {s: summary.meta["splits"][s]["chars"] for s in SPLIT}
    assert counts == SPLIT
    assert summary.meta["vocab_size"] == 28  # 27 symbols + the unknown id
    assert all(summary.meta["splits"][s]["unknown_chars"] == 0 for s in SPLIT)


def test_splits_are_consecutive_slices_and_round_trip(prepared, tmp_path):
    tmp, text, task, _ = prepared
    loaded = data.load(task, data_dir=tmp / "raw", cache_dir=tmp / "cache")
    tok = loaded.tokenizer()
    assert loaded.kind == "stream" and loaded.vocab_size == tok.vocab_size == 28
    pos = 0
    for split, n in SPLIT.items():
        ids = loaded.splits[split].ids
        assert isinstance(ids, np.memmap) and ids.dtype == np.uint8 and len(ids) == n
        assert tok.decode(ids) == text[pos : pos + n].decode()
        pos += n
    enc = tok.encode("Hello world")  # text8 has no capitals: 'H' is unknown, and counted
    assert enc.unknown_chars == 1 and len(enc.ids) == 11


def test_second_prepare_is_a_cache_hit(prepared):
    tmp, _, task, first = prepared
    again = data.prepare(task, data_dir=tmp / "raw", cache_dir=tmp / "cache")
    assert again.cached and again.path == first.path
    assert "cached" in str(again) and "vocab 28 ids" in str(again)


def test_wrong_alphabet_is_rejected(tmp_path):
    text = bytearray(sample_text())
    text[500] = ord("X")
    task = small_task(tmp_path, bytes(text))
    with pytest.raises(ChecksumError, match=r"exactly a-z and space; unexpected \['X'\]"):
        data.prepare(task, data_dir=tmp_path / "raw", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "text8").exists() or not any(
        (tmp_path / "cache" / "text8").iterdir()
    )


def test_wrong_zip_size_is_rejected_and_deleted(tmp_path):
    text = sample_text()
    task = small_task(tmp_path, text, zip_size=len(zipped(text)) + 7)
    with pytest.raises(ChecksumError, match="rejected and deleted"):
        data.download(task, data_dir=tmp_path / "raw")
    assert not (tmp_path / "raw").exists()  # nothing left, not even the folders it made


def test_wrong_member_length_is_rejected(tmp_path):
    text = sample_text()
    task = small_task(tmp_path, text)
    task = text8.make_task(
        url=task.raw_files[0].url, zip_size=None, total_chars=len(text) + 1, split_chars=SPLIT
    )
    with pytest.raises(ChecksumError, match="member 'text8' has 20,000 bytes; text8 has 20,001"):
        data.download(task, data_dir=tmp_path / "raw")


def test_splits_must_add_up():
    with pytest.raises(ValueError, match="add up to 10 characters; the text has 11"):
        text8.split_text8(b"a" * 11, {"train": 8, "valid": 1, "test": 1})
