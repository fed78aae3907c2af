"""The real PTB, poems and MNIST files (../shared/data): checksums, splits, counts, round trips.

The data is prepared once per session into a temporary cache; skipped without the datasets.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from serving.formats import image_to_glimpses
from training import data
from training.data import mnist, poems, ptb
from training.data.fetch import sha256_file

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("prepared")


@pytest.fixture(scope="session")
def ptb_data(shared_data, cache_dir):
    summary = data.prepare("ptb", data_dir=shared_data, cache_dir=cache_dir)
    return summary, data.load("ptb", data_dir=shared_data, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def poems_data(shared_data, cache_dir):
    summary = data.prepare("poems", data_dir=shared_data, cache_dir=cache_dir)
    return summary, data.load("poems", data_dir=shared_data, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def mnist_data(shared_data, cache_dir):
    return data.load("mnist", data_dir=shared_data, cache_dir=cache_dir)


# --------------------------------------------------------------------------------- checksums
@pytest.mark.parametrize(
    "raw", [*ptb.RAW_FILES, *poems.RAW_FILES, *mnist.RAW_FILES], ids=lambda r: r.name
)
def test_shared_files_match_the_pinned_checksums(shared_data, raw):
    task = "ptb" if raw.name.startswith("ptb.") else "poems" if raw.name == "shi.txt" else "mnist"
    path = shared_data / task / raw.name
    assert path.stat().st_size == raw.size
    assert sha256_file(path) == raw.sha256


# --------------------------------------------------------------------------------------- ptb
def test_ptb_counts_and_vocabulary(ptb_data):
    summary, loaded = ptb_data
    counts = {s: summary.meta["splits"][s]["chars"] for s in SPLITS}
    assert counts == {"train": 5_017_482, "valid": 393_042, "test": 442_423}
    assert {s: summary.meta["splits"][s]["lines"] for s in SPLITS} == {
        "train": 42_068,
        "valid": 3_370,
        "test": 3_761,
    }
    assert all(summary.meta["splits"][s]["unknown_chars"] == 0 for s in SPLITS)
    tok = loaded.tokenizer()
    assert loaded.vocab_size == tok.vocab_size == 51 and summary.meta["symbols"] == 50
    pieces = {tok.piece(i) for i in range(tok.vocab_size)}
    assert {"\n", "\u2581", "<", ">", "N", "$"} <= pieces and tok.piece(tok.unk_id) == "\u2047"
    assert len(np.unique(loaded.splits["train"].ids)) == 50  # every symbol but unk occurs


def test_ptb_streams_decode_to_the_word_level_text(shared_data, ptb_data):
    """Independent check: the char files are the word files with spaces spelled '_'."""
    _, loaded = ptb_data
    tok = loaded.tokenizer()
    for split in SPLITS:
        words = (shared_data / "ptb" / f"ptb.{split}.txt").read_text().split("\n")[:-1]
        expected = "".join(line.strip() + "\n" for line in words)
        ids = loaded.splits[split].ids
        assert isinstance(ids, np.memmap) and ids.dtype == np.uint8
        assert tok.decode(ids) == expected
        np.testing.assert_array_equal(tok.encode(expected).ids, ids)


def test_ptb_tokenizer_counts_text_it_never_saw(ptb_data):
    tok = ptb_data[1].tokenizer()
    text = "the Café costs 5€\nnext line"  # capitals, 'é' and '€' never occur in PTB
    enc = tok.encode(text)
    assert len(enc.ids) == len(text) and enc.unknown_chars == 3
    assert tok.decode(enc.ids) == "the \u2047af\u2047 costs 5\u2047\nnext line"


def test_ptb_batches_cover_the_test_split_once(ptb_data):
    ids = ptb_data[1].splits["test"].ids
    n = sum(int(b.mask.sum()) for b in data.lm_eval_batches(ids, 32, 100))
    assert n == len(ids) - 1


def test_cache_is_reused_and_keyed(ptb_data, shared_data, cache_dir):
    first, loaded = ptb_data
    again = data.prepare("ptb", data_dir=shared_data, cache_dir=cache_dir)
    assert again.cached and again.path == first.path == loaded.path
    assert first.path.parent == cache_dir / "ptb"
    assert {p.name for p in first.path.iterdir()} == {
        "meta.json",
        "tokenizer.model",
        "train.npy",
        "valid.npy",
        "test.npy",
    }
    assert first.meta["raw"]["ptb.char.train.txt"]["sha256"] == ptb.RAW_FILES[0].sha256
    assert not [
        p for p in (cache_dir / "ptb").iterdir() if p.name.startswith(".")
    ]  # no temp folders


def test_cli_prepare_prints_the_summary(shared_data, cache_dir, ptb_data, capsys):
    from training.cli import main

    rc = main(
        ["data", "prepare", "ptb", "--data-dir", str(shared_data), "--cache-dir", str(cache_dir)]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert (
        "train 5,017,482 chars; valid 393,042 chars; test 442,423 chars" in out
        and "vocab 51 ids" in out
    )


# ------------------------------------------------------------------------------------- poems
def test_poems_dedup_and_split_counts(poems_data):
    summary, loaded = poems_data
    m = summary.meta
    assert m["lines"] == 16_394 and m["duplicates_dropped"] == 401
    counts = {s: m["splits"][s]["poems"] for s in SPLITS}
    assert counts == {"train": 14_395, "valid": 799, "test": 799} and sum(counts.values()) == 15_993
    assert {s: len(loaded.splits[s]) for s in SPLITS} == counts


def test_poems_are_marked_padded_and_disjoint(shared_data, poems_data):
    _, loaded = poems_data
    tok = loaded.tokenizer()
    lines = (shared_data / "poems" / "shi.txt").read_text(encoding="utf-8").split("\n")[:-1]
    all_poems = {line.replace(" ", "") for line in lines}
    seen: dict[str, str] = {}
    for split in SPLITS:
        s = loaded.splits[split]
        assert s.ids.shape == (len(s), 26) and (s.lengths == 26).all()  # <s> + 24 chars + </s>
        assert (s.ids[:, 0] == tok.bos_id).all() and (s.ids[:, 25] == tok.eos_id).all()
        for row in s.ids:
            text = tok.decode(row)
            assert len(text) == 24
            if "\u2047" not in text:
                assert text in all_poems
            assert seen.setdefault(text, split) == split  # no poem in two splits
    ids, lengths = loaded.splits["train"].ids[:3].copy(), np.array([26, 20, 5], dtype=np.int32)
    ids[1, 19], ids[1, 20:] = tok.eos_id, tok.pad_id
    batch = next(data.sequence_batches(ids, lengths, 3))
    assert batch.mask.sum(axis=0).tolist() == [25, 19, 4]


def test_poems_vocabulary_and_unknowns_are_from_the_train_split(poems_data):
    summary, loaded = poems_data
    tok = loaded.tokenizer()
    texts = {s: [tok.decode(r) for r in loaded.splits[s].ids] for s in SPLITS}
    train_chars = set("".join(texts["train"]))
    assert loaded.vocab_size == len(train_chars) + 4 == 4_693  # + unk, <s>, </s>, <pad>
    for split in ("valid", "test"):
        unknown = sum(p.count("\u2047") for p in texts[split])
        assert unknown == summary.meta["splits"][split]["unknown_chars"] > 0
    assert summary.meta["splits"]["train"]["unknown_chars"] == 0
    enc = tok.encode("床前明月光\uff0c疑是地上霜。Hello")  # Latin letters never occur in the poems
    assert enc.unknown_chars == 5 and len(enc.ids) == 17


def test_poems_split_rule_is_documented_and_stable(shared_data):
    lines = poems.read_poems((shared_data / "poems" / "shi.txt").read_text(encoding="utf-8"))
    distinct = poems.dedupe(lines)
    a = poems.split_poems(distinct)
    b = poems.split_poems(list(reversed(distinct)))
    assert {s: set(a[s]) for s in SPLITS} == {s: set(b[s]) for s in SPLITS}  # order-independent
    test_digest = hashlib.sha256("\n".join(a["test"]).encode()).hexdigest()
    # Pinned: a change of this digest means the poems split changed (and old results too).
    assert test_digest == POEMS_TEST_DIGEST


POEMS_TEST_DIGEST = "6689f9c589a7bf52f554c84387fe2e69f09834b727e3e28a23e51e404843528a"


def test_force_rebuilds_in_place(shared_data, tmp_path, capsys):
    from training.cli import main

    first = data.prepare("poems", data_dir=shared_data, cache_dir=tmp_path)
    stamp = (first.path / "meta.json").stat().st_mtime_ns
    args = [
        "data",
        "prepare",
        "poems",
        "--data-dir",
        str(shared_data),
        "--cache-dir",
        str(tmp_path),
    ]
    assert main(args) == 0 and "cached:" in capsys.readouterr().out
    assert main([*args, "--force"]) == 0
    assert "prepared in" in capsys.readouterr().out
    assert (first.path / "meta.json").stat().st_mtime_ns != stamp  # rebuilt, same key
    assert [p.name for p in (tmp_path / "poems").iterdir()] == [first.path.name]


# ------------------------------------------------------------------------------------- mnist
def test_mnist_splits_and_glimpses(shared_data, mnist_data):
    loaded = mnist_data
    assert loaded.kind == "glimpses" and loaded.num_classes == 10 and loaded.tokenizer() is None
    assert {s: len(loaded.splits[s]) for s in SPLITS} == {
        "train": 55_000,
        "valid": 5_000,
        "test": 10_000,
    }
    train_x = mnist.read_idx(shared_data / "mnist" / "train-images-idx3-ubyte.gz")
    train_y = mnist.read_idx(shared_data / "mnist" / "train-labels-idx1-ubyte.gz")
    test_x = mnist.read_idx(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz")
    tr, va, te = (loaded.splits[s] for s in SPLITS)
    assert tr.glimpses.shape == (55_000, 20, 49) and tr.glimpses.dtype == np.float32
    assert tr.labels.dtype == np.uint8
    # valid is the last 5,000 training images, in order; test is t10k.
    for split, images, labels, rows in (
        (tr, train_x, train_y, [0, 1, 54_999]),
        (va, train_x[55_000:], train_y[55_000:], [0, 4_999]),
        (te, test_x, None, [0, 9_999]),
    ):
        for i in rows:
            np.testing.assert_array_equal(split.glimpses[i], image_to_glimpses(images[i]))
            if labels is not None:
                assert split.labels[i] == labels[i]
    assert np.bincount(te.labels, minlength=10).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    assert float(va.glimpses.min()) == 0.0 and float(va.glimpses.max()) == 1.0
    batch = next(data.glimpse_batches(tr.glimpses, tr.labels, 16, shuffle=True, seed=0))
    assert batch.x.shape == (20, 16, 49) and batch.y.shape == (16,)
