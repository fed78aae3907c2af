"""Wire formats that training and serving share: the MNIST glimpse layout and the tokenizer.

The reader of a format owns its definition, so these live on the serving side and training
imports them (never the other way round). This module imports numpy and sentencepiece only:
no torch, nothing from `training`.

Glimpse layout (Ba et al. 2016, as the Nested LSTM paper describes it): pixels scaled to [0, 1];
the 28x28 image is cut into four 14x14 quadrants in the order top-left, top-right, bottom-left,
bottom-right; for each quadrant come four glimpses of alternate rows and columns
(`q[0::2, 0::2]`, `q[0::2, 1::2]`, `q[1::2, 0::2]`, `q[1::2, 1::2]`) and then the whole quadrant
at half resolution (2x2 mean pooling). Every element is 7x7 = 49 floats, row-major, so an image
is a sequence of 20 elements of 49 floats: element `5 * quadrant + k`, k = 0..3 the glimpses
above and k = 4 the pooled quadrant.

Tokenizer: a sentencepiece model of type `char`, used so that every character of the text is
exactly one id. sentencepiece itself merges a run of unknown characters into one `<unk>` piece;
`Tokenizer.encode` splits such a run back into one unknown id per character and counts them, so
sequence lengths, bits per character and the server's `unknown_chars` all count characters.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import sentencepiece as spm

# ------------------------------------------------------------------------------------ glimpses
IMAGE_SIDE = 28  # MNIST images are 28x28
QUADRANT_SIDE = IMAGE_SIDE // 2  # 14
GLIMPSE_SIDE = QUADRANT_SIDE // 2  # 7
GLIMPSE_SIZE = GLIMPSE_SIDE * GLIMPSE_SIDE  # 49 floats per sequence element
ELEMENTS_PER_QUADRANT = 5  # four alternate-row/column glimpses, then the pooled quadrant
GLIMPSES_PER_IMAGE = 4 * ELEMENTS_PER_QUADRANT  # 20 sequence elements per image


def image_to_glimpses(image: np.ndarray) -> np.ndarray:
    """Turn MNIST images into glimpse sequences, the wire format of the glimpse stream.

    `image` is one image (28, 28) or a batch (N, 28, 28): uint8 pixels in 0..255 (scaled by
    1/255 here) or floats already scaled to [0, 1]. Returns float32 of shape (20, 49) for one
    image, (N, 20, 49) for a batch; see the module docstring for the order of the 20 elements.
    """
    x = np.asarray(image)
    if x.ndim not in (2, 3) or x.shape[-2:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(
            f"an MNIST image must have shape (28, 28) or (N, 28, 28); got shape {x.shape}"
        )
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
        if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise ValueError(
                "float images must already be scaled to [0, 1] (pass uint8 pixels 0..255 to have "
                f"them scaled); got values in [{x.min()}, {x.max()}]"
            )
    else:
        raise ValueError(
            f"image pixels must be uint8 (0..255) or float (0..1); got dtype {x.dtype}"
        )
    single = x.ndim == 2
    x = x.reshape(-1, 2, QUADRANT_SIDE, 2, QUADRANT_SIDE)  # (N, qi, 14, qj, 14)
    # Quadrants in row-major order of (qi, qj): top-left, top-right, bottom-left, bottom-right.
    q = x.transpose(0, 1, 3, 2, 4).reshape(-1, 4, QUADRANT_SIDE, QUADRANT_SIDE)  # (N, 4, 14, 14)
    g00 = q[:, :, 0::2, 0::2]  # (N, 4, 7, 7)
    g01 = q[:, :, 0::2, 1::2]
    g10 = q[:, :, 1::2, 0::2]
    g11 = q[:, :, 1::2, 1::2]
    # The 2x2 block at (2i, 2j) holds exactly g00/g01/g10/g11 at (i, j): their mean is the pooling.
    pooled = (g00 + g01 + g10 + g11) * np.float32(0.25)  # (N, 4, 7, 7)
    out = np.stack([g00, g01, g10, g11, pooled], axis=2)  # (N, 4, 5, 7, 7)
    out = np.ascontiguousarray(out.reshape(-1, GLIMPSES_PER_IMAGE, GLIMPSE_SIZE))  # (N, 20, 49)
    return out[0] if single else out


# ----------------------------------------------------------------------------------- tokenizer
class Encoding(NamedTuple):
    """The ids of a text, one per character, and how many characters were out of vocabulary."""

    ids: np.ndarray  # (T,) int64, T == len(text)
    unknown_chars: int  # characters that became `unk_id` (counted, never dropped)


class Tokenizer:
    """A sentencepiece `char` model: one id per character, out-of-vocabulary characters -> `unk_id`.

    Construct with `Tokenizer.from_file(path)` or `Tokenizer.from_bytes(model_proto)`; the
    serialized model (`model_proto`) is what checkpoints and exported models carry.
    """

    def __init__(self, model_proto: bytes):
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as exc:
            raise ValueError(f"not a valid sentencepiece model ({exc})") from None
        self._sp = sp
        self.model_proto = bytes(model_proto)
        self.vocab_size: int = sp.get_piece_size()
        self.unk_id: int = sp.unk_id()
        self.bos_id: int = sp.bos_id()  # -1 when the model has no begin marker
        self.eos_id: int = sp.eos_id()  # -1 when the model has no end marker
        self.pad_id: int = sp.pad_id()  # -1 when the model has no padding id

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer model not found: {path}") from None
        return cls(data)

    @classmethod
    def from_bytes(cls, model_proto: bytes) -> Tokenizer:
        return cls(model_proto)

    def piece(self, i: int) -> str:
        """The vocabulary entry of id `i` (the space is sentencepiece's U+2581 marker)."""
        self._check_ids([i])
        return self._sp.id_to_piece(int(i))

    def encode(self, text: str) -> Encoding:
        """Ids of `text`, one per character; characters outside the vocabulary become `unk_id`.

        The count of such characters comes back with the ids: nothing is dropped silently.
        (U+2581 '▁', sentencepiece's space marker, encodes as a space.)
        """
        if not isinstance(text, str):
            raise TypeError(f"text to encode must be a str; got {type(text).__name__}")
        ids = self._sp.encode(text)
        n_known = len(ids) - ids.count(self.unk_id)
        unknown = len(text) - n_known
        if unknown:
            # sentencepiece merges a run of unknown characters into one unk piece: split it
            # back into one unk id per character (the surface is the run's original text).
            ids = []
            for p in self._sp.encode(text, out_type="proto").pieces:
                ids.extend([self.unk_id] * len(p.surface) if p.id == self.unk_id else [p.id])
        out = np.asarray(ids, dtype=np.int64)
        if len(out) != len(text):  # pragma: no cover - guards the one-id-per-character contract
            raise ValueError(
                f"tokenizer is not a character model: {len(text)} characters gave {len(out)} ids"
            )
        return Encoding(out, unknown)

    def decode(self, ids) -> str:
        """Text of `ids`; markers (bos/eos/pad) decode to nothing, `unk_id` to U+2047 '⁇'."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        self._check_ids(ids)
        return self._sp.decode(ids)

    def _check_ids(self, ids) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is out of range: ids must be in [0, {self.vocab_size})"
            )
