"""Wire formats that training and serving share: the MNIST glimpse layout, where raw data
lives, and the tokenizer.

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

Exported model folder: `meta.json`, described by `ExportMeta` below (its schema, validation and
`EXPORT_FORMAT_VERSION`); docs/export.md is the prose version.

Tokenizer: a sentencepiece model of type `char`, used so that every character of the text is
exactly one id. sentencepiece itself merges a run of unknown characters into one `<unk>` piece;
`Tokenizer.encode` splits such a run back into one unknown id per character and counts them, so
sequence lengths, bits per character and the server's `unknown_chars` all count characters.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

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


# ---------------------------------------------------------------------------- raw data folder
DATA_DIR_ENV = "NLSTM_DATA_DIR"


def default_data_dir() -> Path:
    """$NLSTM_DATA_DIR, else a per-user cache folder ($XDG_CACHE_HOME or ~/.cache)/nlstm/raw:
    where `nlstm data download` puts the raw files, as DIR/TASK/FILE (`nlstm classify` reads
    the MNIST test images there)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "nlstm" / "raw"


# ----------------------------------------------------------------------------------- tokenizer
class Encoding(NamedTuple):
    """The ids of a text, one per character, and how many characters were out of vocabulary."""

    ids: np.ndarray  # (T,) int64, T == len(text)
    unknown_chars: int  # characters that became `unk_id` (counted, never dropped)


def start_id(tokenizer: Tokenizer) -> int:
    """The id a fresh sequence starts from, whose prediction scores the first character: the
    begin-of-sequence marker if the vocabulary has one (the poems), else the newline if it is in
    the vocabulary (PTB: text follows a line break), else the space (text8). The server and
    `ExportedModel.score` both start here, so their figures agree."""
    if tokenizer.bos_id is not None and tokenizer.bos_id >= 0:
        return tokenizer.bos_id
    for ch in ("\n", " "):
        enc = tokenizer.encode(ch)
        if len(enc.ids) == 1 and enc.unknown_chars == 0:
            return int(enc.ids[0])
    return 0


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


# ------------------------------------------------------------------------ exported model folder
EXPORT_FORMAT = "nlstm-export"  # the marker that says "this folder is an exported nlstm model"
EXPORT_FORMAT_VERSION = 2  # bump on any change to the meta.json schema or the graph contract
# Versions this reader accepts. Version 1 predates `precision` and `quantization`: its graphs are
# float32, which is what the defaults of those two fields say, so it reads as is.
READABLE_FORMAT_VERSIONS = (1, 2)
META_FILE = "meta.json"
STEP_GRAPH = "model.onnx"
SEQUENCE_GRAPH = "sequence.onnx"
TOKENIZER_FILE = "tokenizer.model"
# The graphs' names. Step graph: INPUT (B) int64 or (B, 49) float32, "state" (B, S, H) float32
# -> "logits" (B, V), "state_out" (B, S, H). The sequence graph is the same with a leading time
# axis on the input and the logits: (T, B) or (T, B, 49) -> (T, B, V); the state has none.
CORES = ("nlstm", "lstm", "hmlstm")
CHAR_INPUT = ("tokens", "int64")
GLIMPSE_INPUT = ("glimpse", "float32")
STATE_INPUT, LOGITS_OUTPUT, STATE_OUTPUT = "state", "logits", "state_out"
# The arithmetic a folder's graphs compute in (`ExportMeta.precision`). Inputs, outputs and the
# state stay float32 in all of them (same names, same shapes), but the values differ: a state
# written by one precision is not a state of the other, so the precision is part of a model's
# identity. int8: weights int8 with onnxruntime's quantization tools (training/quantize.py);
# float16 / bfloat16: GPU step graphs whose weights and arithmetic are 16-bit.
PRECISIONS = ("float32", "int8", "float16", "bfloat16")


class ExportFormatError(ValueError):
    """A folder or meta.json that is not a readable nlstm export (missing, corrupt, too new,
    or files that do not match their recorded hashes)."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (how meta.json pins every other file of the folder)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ExportMeta:
    """meta.json of an exported model folder: everything a server needs to run the graphs
    without the training code. Written by training/export.py, read by serving/runtime.py."""

    task: str  # what it was trained on: "ptb", "text8", "poems", "mnist", or a test task name
    kind: str  # "char" (character language model) or "glimpse" (MNIST glimpse classifier)
    core: str  # recurrent core: "nlstm", "lstm" or "hmlstm"
    depth: int  # nesting depth of each layer (1 for LSTM and HM-LSTM)
    num_layers: int  # stacked layers
    hidden_size: int  # H: cells per layer
    outer_activation: str  # NLSTM level-0 candidate activation ("identity" | "tanh"); others "tanh"
    vocab_size: int | None  # char models: V, symbols in and out (= the tokenizer's size)
    input_size: int | None  # glimpse models: floats per step (49)
    num_classes: int | None  # glimpse models: classes (10)
    input_name: str  # "tokens" (char) or "glimpse"
    input_dtype: str  # "int64" (char) or "float32" (glimpse)
    state_slots: list[str]  # names of the S state slots in order: "layer0.h", "layer0.c0", ...
    files: dict[str, str]  # file name -> sha256 hex, for every file of the folder but meta.json
    sequence_graph: bool  # whether sequence.onnx (a whole sequence in one call) is shipped
    opset: int  # ONNX opset of the graphs
    ir_version: int  # ONNX IR version of the graphs
    figures: dict[str, Any] = field(default_factory=dict)  # valid/test figures at the best epoch
    metrics: dict[str, Any] = field(default_factory=dict)  # the checkpoint's metrics, verbatim
    train_config: dict[str, Any] = field(default_factory=dict)  # the training run's config
    model_config: dict[str, Any] = field(default_factory=dict)  # training's ModelConfig, verbatim
    sequence_timing: dict[str, Any] = field(default_factory=dict)  # the ship-or-not measurement
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint, step, epoch, versions
    precision: str = "float32"  # one of PRECISIONS: what the graphs compute in (part of identity)
    # Quantized folders: the settings, the float32 model's figures measured beside this one's
    # on the same splits, the cost, the thresholds and the speeds measured (docs/export.md).
    quantization: dict[str, Any] = field(default_factory=dict)
    format: str = EXPORT_FORMAT
    format_version: int = EXPORT_FORMAT_VERSION

    # ------------------------------------------------------------------ derived
    @property
    def num_slots(self) -> int:  # S
        return len(self.state_slots)

    @property
    def state_shape(self) -> tuple[int, int]:  # (S, H): the state is (B, S, H)
        return (self.num_slots, self.hidden_size)

    @property
    def output_size(self) -> int:  # V or the number of classes: logits are (B, output_size)
        size = self.vocab_size if self.kind == "char" else self.num_classes
        assert size is not None, "validate() requires the kind's size"
        return size

    @property
    def has_tokenizer(self) -> bool:
        return TOKENIZER_FILE in self.files

    # ---------------------------------------------------------------- validation
    def validate(self) -> ExportMeta:
        def bad(msg: str):
            raise ExportFormatError(f"meta.json: {msg}")

        if self.format != EXPORT_FORMAT:
            bad(f"format must be {EXPORT_FORMAT!r}, got {self.format!r}")
        if self.format_version not in READABLE_FORMAT_VERSIONS:
            bad(
                f"format version {self.format_version} is not readable by this nlstm, which "
                f"reads versions {READABLE_FORMAT_VERSIONS} (export the model again with this "
                "version, or use the nlstm that wrote it)"
            )
        if self.precision not in PRECISIONS:
            bad(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if (self.precision == "float32") != (not self.quantization):
            bad(
                "quantization settings belong to int8/float16/bfloat16 folders and those need "
                f"them; got precision {self.precision!r} with quantization {self.quantization!r}"
            )
        if self.kind not in ("char", "glimpse"):
            bad(f"kind must be 'char' or 'glimpse', got {self.kind!r}")
        if self.core not in CORES:
            bad(f"core must be one of {CORES}, got {self.core!r}")
        for name in ("depth", "num_layers", "hidden_size", "opset", "ir_version"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f"{name} must be an integer >= 1, got {v!r}")
        if self.core != "nlstm" and self.depth != 1:
            bad(f"a {self.core} model has depth 1, got {self.depth}")
        expected_input = CHAR_INPUT if self.kind == "char" else GLIMPSE_INPUT
        if (self.input_name, self.input_dtype) != expected_input:
            bad(
                f"a {self.kind} model's input is {expected_input[0]!r} of {expected_input[1]}, "
                f"got {self.input_name!r} of {self.input_dtype}"
            )
        size_fields = ("vocab_size",) if self.kind == "char" else ("input_size", "num_classes")
        for name in size_fields:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f"a {self.kind} model needs {name} >= 1, got {v!r}")
        if self.core == "hmlstm":  # (h, c, z) per layer, (h, c) on the last
            n_slots = 3 * (self.num_layers - 1) + 2
        else:  # h and one memory per nesting level
            n_slots = (self.depth + 1) * self.num_layers
        if len(self.state_slots) != n_slots or len(set(self.state_slots)) != n_slots:
            bad(
                f"state_slots must name {n_slots} distinct slots for a {self.num_layers}-layer "
                f"{self.core} of depth {self.depth}, got {self.state_slots}"
            )
        if not isinstance(self.files, dict) or STEP_GRAPH not in self.files:
            bad(f"files must list {STEP_GRAPH!r} with its sha256, got {self.files!r}")
        for name, digest in self.files.items():
            if "/" in name or "\\" in name or name in ("", ".", "..", META_FILE):
                bad(
                    f"files may only name plain files of the folder (not {META_FILE}), got {name!r}"
                )
            if not (isinstance(digest, str) and len(digest) == 64):
                bad(f"files[{name!r}] must be a sha256 hex digest, got {digest!r}")
        if self.sequence_graph != (SEQUENCE_GRAPH in self.files):
            listed = "lists" if SEQUENCE_GRAPH in self.files else "does not list"
            bad(f"sequence_graph is {self.sequence_graph} but files {listed} {SEQUENCE_GRAPH!r}")
        if self.kind == "char" and not self.has_tokenizer:
            bad(f"a char model's folder must hold its {TOKENIZER_FILE!r}")
        return self

    # ------------------------------------------------------------------- json
    def to_json(self) -> str:
        """Always the current version: a version-1 meta read and written again becomes a
        version-2 one that says `precision: float32` (what version 1 meant)."""
        d = {**asdict(self.validate()), "format_version": EXPORT_FORMAT_VERSION}
        return json.dumps(d, indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> ExportMeta:
        try:
            d = json.loads(text)
        except ValueError as exc:
            raise ExportFormatError(f"meta.json is not valid JSON: {exc}") from None
        if not isinstance(d, dict) or d.get("format") != EXPORT_FORMAT:
            raise ExportFormatError(
                f'meta.json is not an nlstm export\'s (expected "format": {EXPORT_FORMAT!r})'
            )
        # The version first: a newer writer may have changed every other field.
        version = d.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ExportFormatError(
                f"meta.json has export format version {version!r}; this nlstm reads versions "
                f"{READABLE_FORMAT_VERSIONS} (export the model again with this version, or use the "
                "nlstm that wrote it)"
            )
        known = {f.name for f in fields(cls)}
        if version == 1:  # written before precision and quantization existed: float32
            known -= {"precision", "quantization"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ExportFormatError(
                f"meta.json has unknown keys {unknown}; allowed: {sorted(known)}"
            )
        required = {
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        }
        missing = sorted(required - set(d))
        if missing:
            raise ExportFormatError(f"meta.json lacks the keys {missing}")
        return cls(**d).validate()

    @classmethod
    def from_folder(cls, folder: str | Path) -> ExportMeta:
        path = Path(folder) / META_FILE
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            raise ExportFormatError(
                f"{folder} is not an exported model folder: it has no {META_FILE}"
            ) from None
        return cls.from_json(text)

    def verify_files(self, folder: str | Path) -> None:
        """Check every listed file's sha256; a missing or changed file is an ExportFormatError."""
        folder = Path(folder)
        for name, digest in self.files.items():
            path = folder / name
            if not path.is_file():
                raise ExportFormatError(f"{folder}: {name} is listed in {META_FILE} but missing")
            actual = file_sha256(path)
            if actual != digest:
                raise ExportFormatError(
                    f"{folder}: {name} does not match its sha256 in {META_FILE} (expected "
                    f"{digest[:12]}..., found {actual[:12]}...): the file was changed or "
                    "corrupted; export the model again"
                )
