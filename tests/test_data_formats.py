"""serving.formats: the glimpse layout against hand-built images, and the char tokenizer's
contract."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.formats import (
    GLIMPSE_SIZE,
    GLIMPSES_PER_IMAGE,
    Tokenizer,
    image_to_glimpses,
)
from training.data.tokenizer import train_char_tokenizer


# ------------------------------------------------------------------------------------ glimpses
def coded_image() -> np.ndarray:
    """Pixel (r, c) = (28 r + c) / 1024: every value distinct and exact in float32, all in
    [0, 1)."""
    r, c = np.mgrid[0:28, 0:28]
    return ((28 * r + c) / 1024).astype(np.float32)


def expected_glimpses(value) -> np.ndarray:
    """The layout written out from the paper/issue text with plain loops, no slicing tricks."""
    out = np.zeros((20, 49), dtype=np.float64)
    element = 0
    for qi, qj in [(0, 0), (0, 1), (1, 0), (1, 1)]:  # TL, TR, BL, BR
        top, left = 14 * qi, 14 * qj
        for a, b in [(0, 0), (0, 1), (1, 0), (1, 1)]:  # q[a::2, b::2]
            for i in range(7):
                for j in range(7):
                    out[element, 7 * i + j] = value(top + 2 * i + a, left + 2 * j + b)
            element += 1
        for i in range(7):  # the whole quadrant, 2x2 mean pooling
            for j in range(7):
                block = [
                    value(top + 2 * i + di, left + 2 * j + dj) for di in (0, 1) for dj in (0, 1)
                ]
                out[element, 7 * i + j] = sum(block) / 4
        element += 1
    return out


def test_constants():
    assert (GLIMPSE_SIZE, GLIMPSES_PER_IMAGE) == (49, 20)


def test_glimpses_of_coded_float_image_are_exact():
    got = image_to_glimpses(coded_image())
    assert got.shape == (20, 49) and got.dtype == np.float32
    want = expected_glimpses(lambda r, c: (28 * r + c) / 1024)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    # Spot checks a reader can verify by hand: element 0 starts at pixel (0, 0), element 1 at
    # (0, 1), element 5 (top-right quadrant) at (0, 14), element 10 (bottom-left) at (14, 0).
    assert got[0, 0] == 0 and got[1, 0] == 1 / 1024 and got[2, 0] == 28 / 1024
    assert got[0, 1] == 2 / 1024 and got[0, 7] == 56 / 1024  # row-major: next column, next row
    assert (
        got[5, 0] == 14 / 1024
        and got[10, 0] == 14 * 28 / 1024
        and got[15, 0] == (14 * 28 + 14) / 1024
    )
    assert got[4, 0] == (0 + 1 + 28 + 29) / 4 / 1024


def test_uint8_images_are_scaled_to_unit_range():
    r, c = np.mgrid[0:28, 0:28]
    img = ((r * 9 + c * 7) % 256).astype(np.uint8)
    got = image_to_glimpses(img)
    want = expected_glimpses(lambda y, x: float(img[y, x]) / 255)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert got.min() >= 0 and got.max() <= 1


def test_batched_equals_one_by_one():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    batch = image_to_glimpses(images)
    assert batch.shape == (5, 20, 49)
    for i in range(5):
        np.testing.assert_array_equal(batch[i], image_to_glimpses(images[i]))


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((28, 27), np.uint8), "shape"),
        (np.zeros((2, 3, 28, 28), np.uint8), "shape"),
        (np.full((28, 28), 255.0), r"scaled to \[0, 1\]"),
        (np.full((28, 28), np.nan, np.float32), r"scaled to \[0, 1\]"),
        (np.zeros((28, 28), np.int64), "uint8"),
    ],
)
def test_bad_images_are_rejected_with_what_is_allowed(image, message):
    with pytest.raises(ValueError, match=message):
        image_to_glimpses(image)


def test_formats_does_not_import_torch_or_training():
    code = (
        "import sys, serving.formats; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('training')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------- tokenizer
TRAIN_LINES = ["the cat sat on the mat", "a <unk> b", "  double  spaces ", ""]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_char_tokenizer(TRAIN_LINES, newline=True)


def test_vocabulary_is_training_characters_plus_unk_and_newline(tok):
    chars = set("".join(TRAIN_LINES))
    assert tok.vocab_size == len(chars) + 2  # + unk + "\n"
    assert tok.unk_id == 0 and tok.bos_id == tok.eos_id == tok.pad_id == -1
    pieces = {tok.piece(i) for i in range(tok.vocab_size)}
    assert {"<", ">", "\n", "\u2581"} <= pieces  # '<' '>' survive the literal "<unk>"


def test_round_trip_is_exact_with_newlines_and_spaces(tok):
    text = "the cat\n  sat <unk>  \n\non a mat \n"
    enc = tok.encode(text)
    assert enc.unknown_chars == 0
    assert len(enc.ids) == len(text) and enc.ids.dtype == np.int64
    assert tok.decode(enc.ids) == text


def test_unknown_characters_are_one_id_each_and_counted(tok):
    text = "cat éé€ 世界!"  # 'é', 'é', '€', '世', '界', '!' are unseen: six, in runs
    enc = tok.encode(text)
    assert len(enc.ids) == len(text)
    assert enc.unknown_chars == 6
    assert (enc.ids == tok.unk_id).sum() == 6
    assert tok.decode(enc.ids) == "cat \u2047\u2047\u2047 \u2047\u2047\u2047"


@settings(max_examples=60, deadline=None)
@given(
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"),
        max_size=40,
    )
)
def test_any_text_gives_one_id_per_character(tok, text):
    known = {tok.piece(i) for i in range(1, tok.vocab_size)}
    enc = tok.encode(text)
    assert len(enc.ids) == len(text)
    n_unknown = sum(1 for ch in text if ("\u2581" if ch == " " else ch) not in known)
    assert enc.unknown_chars == n_unknown == int((enc.ids == tok.unk_id).sum())
    if n_unknown == 0:
        assert tok.decode(enc.ids) == text


def test_markers_and_padding_ids():
    t = train_char_tokenizer(["床前明月光", "疑是地上霜"], markers=True)
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2, 3)
    assert t.vocab_size == 4 + len(set("床前明月光疑是地上霜"))
    ids = [t.bos_id, *t.encode("明月").ids, t.eos_id, t.pad_id, t.pad_id]
    assert t.decode(ids) == "明月"  # markers and padding decode to nothing


def test_tokenizer_survives_serialization(tok, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(tok.model_proto)
    again = Tokenizer.from_file(path)
    assert again.vocab_size == tok.vocab_size
    np.testing.assert_array_equal(again.encode("the mat\n").ids, tok.encode("the mat\n").ids)


def test_tokenizer_errors_say_what_is_allowed(tok, tmp_path):
    with pytest.raises(ValueError, match=r"out of range: ids must be in \[0, "):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError, match="must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        Tokenizer.from_bytes(b"not a model")
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer.from_file(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="must not contain newlines"):
        train_char_tokenizer(["a\nb"])
