"""Training the text tasks' sentencepiece `char` models, and encoding whole splits with them.

Decisions (docs/data.md explains them):
- `model_type=char`, `character_coverage=1.0`, trained on the training split only.
- Identity normalization, no dummy prefix, no whitespace collapsing, no byte fallback: encode and
  decode round-trip exactly, and every character is one id (see `serving.formats.Tokenizer`).
- sentencepiece reads its input as lines, so it never sees a newline; tasks whose text has
  newlines (PTB) add "\\n" as a user-defined symbol, which then encodes and decodes like any
  character.
- The unknown piece is U+2047 '⁇' (also what it decodes to), not the usual "<unk>": PTB's text
  contains the literal string "<unk>", which the trainer would otherwise swallow, losing '<'
  and '>' from the vocabulary. Out-of-vocabulary characters become the unknown id and are
  counted by `Tokenizer.encode`.
- The vocabulary size is not a knob: it is the number of distinct training characters plus the
  special pieces, and training fails loudly if any training character is missing afterwards
  (sentencepiece would otherwise drop the rarest ones silently).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from serving.formats import Tokenizer

UNK_PIECE = "\u2047"  # '⁇'
BOS_PIECE, EOS_PIECE, PAD_PIECE = "<s>", "</s>", "<pad>"
SP_SPACE = "\u2581"  # sentencepiece's visible space '▁'
# Longest line sentencepiece's trainer accepts; longer ones it would skip without a word.
MAX_SENTENCE_CHARS = 1 << 15


def train_char_tokenizer(
    lines: Sequence[str],
    *,
    newline: bool = False,
    markers: bool = False,
) -> Tokenizer:
    """Train a sentencepiece char model on `lines` (the training split, without newlines).

    newline: add "\\n" as a symbol (for texts whose lines matter, like PTB).
    markers: add begin/end-of-sequence markers and a padding id (for the poems): ids are then
        unk 0, bos 1, eos 2, pad 3; otherwise only unk 0 exists besides the characters.
    """
    chars: set[str] = set()
    for line in lines:
        if "\n" in line:
            raise ValueError(
                "tokenizer training lines must not contain newlines; pass newline=True"
            )
        if len(line) > MAX_SENTENCE_CHARS:
            raise ValueError(
                f"a tokenizer training line has {len(line)} characters; at most "
                f"{MAX_SENTENCE_CHARS} are allowed (split long texts into chunks)"
            )
        chars.update(line)
    if not chars:
        raise ValueError("cannot train a tokenizer on empty text")
    for reserved in (UNK_PIECE, SP_SPACE):
        if reserved in chars:
            raise ValueError(
                f"training text contains {reserved!r} (U+{ord(reserved):04X}), which the "
                "tokenizer reserves; remove or replace it"
            )
    n_special = 1 + (3 if markers else 0) + (1 if newline else 0)
    expected = len(chars) + n_special
    marker_ids = (1, 2, 3) if markers else (-1, -1, -1)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="char",
        vocab_size=expected,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        byte_fallback=False,
        user_defined_symbols=["\n"] if newline else [],
        unk_id=0,
        unk_piece=UNK_PIECE,
        unk_surface=UNK_PIECE,
        bos_piece=BOS_PIECE,
        eos_piece=EOS_PIECE,
        pad_piece=PAD_PIECE,
        max_sentence_length=4 * MAX_SENTENCE_CHARS,  # in bytes; UTF-8 needs at most 4 per char
        input_sentence_size=0,  # use every line, no sampling
        num_threads=2,
        minloglevel=2,
        bos_id=marker_ids[0],
        eos_id=marker_ids[1],
        pad_id=marker_ids[2],
    )
    tok = Tokenizer.from_bytes(model.getvalue())
    pieces = {tok.piece(i) for i in range(tok.vocab_size)}
    missing = sorted(c for c in chars if (SP_SPACE if c == " " else c) not in pieces)
    if missing or tok.vocab_size != expected:
        raise ValueError(  # pragma: no cover - a sentencepiece behaviour change would land here
            f"sentencepiece built {tok.vocab_size} pieces, expected {expected}; "
            f"training characters missing from the vocabulary: {missing[:20]}"
        )
    return tok


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary (ids are cached in it)."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def encode_stream(
    tok: Tokenizer,
    chunks: Iterable[str],
    total_chars: int,
    out: np.ndarray | None = None,
    *,
    desc: str = "encode",
    progress: bool = False,
) -> tuple[np.ndarray, int]:
    """Encode a text given as consecutive chunks into one id stream of `total_chars` ids.

    Writes into `out` (e.g. a memory-mapped .npy) when given, else a new array of
    `id_dtype(vocab)`. Returns (ids, unknown character count).
    """
    if out is None:
        out = np.empty(total_chars, dtype=id_dtype(tok.vocab_size))
    if out.shape != (total_chars,):
        raise ValueError(f"output array has shape {out.shape}; expected ({total_chars},)")
    pos = unknown = 0
    with tqdm(
        total=total_chars, desc=desc, unit="char", unit_scale=True, disable=not progress
    ) as bar:
        for chunk in chunks:
            enc = tok.encode(chunk)
            if pos + len(enc.ids) > total_chars:
                raise ValueError(f"text is longer than the announced {total_chars} characters")
            out[pos : pos + len(enc.ids)] = enc.ids
            pos += len(enc.ids)
            unknown += enc.unknown_chars
            bar.update(len(enc.ids))
    if pos != total_chars:
        raise ValueError(f"text has {pos} characters; {total_chars} were announced")
    return out, unknown
