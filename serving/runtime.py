"""Run an exported model folder on onnxruntime: what the server and `nlstm score` load.

    model = load_model("exported/ptb-nlstm")        # checks every file's sha256 first
    state = model.initial_state(batch=4)            # (4, S, H) float32 zeros
    logits, state = model.step(tokens, state)       # tokens (4,) int64 -> logits (4, V)
    model.score("the cat sat").bits_per_char         # char models
    model.classify(image_to_glimpses(images))       # glimpse models: (N, 10) logits

The state is the caller's: onnxruntime sessions are stateless, and `step` returns the new state
without keeping it (the server's session store owns it). Its layout is meta.json's
`state_slots`, the same (B, S, H) layout training packs (docs/export.md).

Providers: "auto" (the default) asks for CUDA when this onnxruntime build offers it and keeps it
only if a created session really runs on it (a GPU wheel on a machine without a GPU or without
CUDA libraries falls back to the CPU provider); "cpu" and "cuda" force one ("cuda" fails
clearly when it cannot start). On CUDA, inputs and outputs go through I/O binding, and `run`
and `score` keep the state on the GPU between steps. Thread counts are session settings.

This module imports numpy, onnxruntime and serving.formats only: never torch (torch's thread
pools slow onnxruntime 2.5-3.5x in one process, and the serving image does not carry it) and
nothing from `training`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.formats import (
    LOGITS_OUTPUT,
    SEQUENCE_GRAPH,
    STATE_INPUT,
    STATE_OUTPUT,
    STEP_GRAPH,
    TOKENIZER_FILE,
    ExportFormatError,
    ExportMeta,
    Tokenizer,
    start_id,
)

log = logging.getLogger(__name__)

PROVIDER_CHOICES = ("auto", "cpu", "cuda")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# Bound on the logits one sequence-graph call materialises, (T, B, V) float32: longer inputs
# are scored in chunks with the state carried across (same result).
MAX_LOGITS_BYTES = 64 << 20


@dataclass
class Score:
    """How well a char model predicts a text."""

    bits_per_char: float  # mean -log2 p(char | preceding text) over the scored characters
    nats: float  # total negative log-likelihood, natural log
    chars: int  # characters scored
    unknown_chars: int  # characters outside the vocabulary (scored as the unknown id)
    state: np.ndarray  # (1, S, H) state after reading the whole text
    bits: np.ndarray  # (chars,) float64: -log2 p of each scored character

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats / self.chars) if self.chars else float("nan")


@contextlib.contextmanager
def _quiet_provider_probe() -> Iterator[None]:
    # A GPU build of onnxruntime on a machine without CUDA logs an ERROR through its default
    # logger when the CUDA provider fails to load. In "auto" that is the expected outcome on a
    # CPU machine, so the probe runs with that logger silenced; 2 (warning) is its default level.
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)


def _provider_list(providers: str | Sequence) -> list:
    if isinstance(providers, str):
        if providers not in PROVIDER_CHOICES:
            raise ValueError(
                f"providers must be one of {PROVIDER_CHOICES} or a list of onnxruntime provider "
                f"names, got {providers!r}"
            )
        if providers == "cpu":
            return [CPU]
        available = ort.get_available_providers()
        if CUDA not in available:
            if providers == "cuda":
                raise RuntimeError(
                    "providers='cuda' but this onnxruntime build has no CUDA provider (available: "
                    f"{available}); replace the CPU build with the GPU one (`pip uninstall -y "
                    "onnxruntime && pip install onnxruntime-gpu`: the two must not be installed "
                    "together) or use providers='cpu'"
                )
            return [CPU]
        return [CUDA, CPU]
    return list(providers)


def _session_options(
    intra_op_threads: int | None, inter_op_threads: int | None
) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    for name, value in (
        ("intra_op_threads", intra_op_threads),
        ("inter_op_threads", inter_op_threads),
    ):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(
                f"{name} must be an integer >= 0 (0: onnxruntime's choice), got {value!r}"
            )
    if intra_op_threads is not None:
        opts.intra_op_num_threads = intra_op_threads
    if inter_op_threads is not None:
        opts.inter_op_num_threads = inter_op_threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def _create_session(
    path: Path, providers: str | Sequence, opts: ort.SessionOptions
) -> ort.InferenceSession:
    plist = _provider_list(providers)
    quiet = providers == "auto" and CUDA in plist
    with _quiet_provider_probe() if quiet else contextlib.nullcontext():
        try:
            sess = ort.InferenceSession(str(path), opts, providers=plist)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportFormatError(f"onnxruntime cannot load {path}: {exc}") from None
    if providers == "cuda" and sess.get_providers()[0] != CUDA:
        raise RuntimeError(
            f"providers='cuda' but onnxruntime could not start the CUDA provider for {path} "
            f"(the session runs on {sess.get_providers()}): check the GPU, CUDA and cuDNN "
            "libraries onnxruntime-gpu needs, or use providers='cpu'"
        )
    return sess


class ExportedModel:
    """An exported folder loaded on onnxruntime. Construct with `load_model`."""

    def __init__(
        self,
        folder: Path,
        meta: ExportMeta,
        tokenizer: Tokenizer | None,
        step_session: ort.InferenceSession,
        sequence_session: ort.InferenceSession | None,
    ) -> None:
        self.folder = folder
        self.meta = meta
        self.tokenizer = tokenizer
        self._step = step_session
        self._sequence = sequence_session
        self.providers: list[str] = step_session.get_providers()
        self.device = "cuda" if self.providers[0] == CUDA else "cpu"
        self._check_graph_signature()

    # ------------------------------------------------------------------ description
    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def input_name(self) -> str:
        return self.meta.input_name

    @property
    def state_slots(self) -> list[str]:
        return list(self.meta.state_slots)

    @property
    def state_shape(self) -> tuple[int, int]:
        """(S, H): a state for batch B is (B, S, H)."""
        return self.meta.state_shape

    @property
    def output_size(self) -> int:
        """V for char models, the number of classes for glimpse models."""
        return self.meta.output_size

    @property
    def has_sequence_graph(self) -> bool:
        return self._sequence is not None

    def __repr__(self) -> str:
        return (
            f"ExportedModel({str(self.folder)!r}, task={self.meta.task!r}, kind={self.kind!r}, "
            f"core={self.meta.core!r}, state=(B, {self.state_shape[0]}, {self.state_shape[1]}), "
            f"device={self.device!r}, sequence_graph={self.has_sequence_graph})"
        )

    def _check_graph_signature(self) -> None:
        """The graph must be the one meta.json describes (names, state shape)."""
        ins = {i.name: i for i in self._step.get_inputs()}
        outs = {o.name for o in self._step.get_outputs()}
        want_in, want_out = {self.input_name, STATE_INPUT}, {LOGITS_OUTPUT, STATE_OUTPUT}
        if set(ins) != want_in or outs != want_out:
            raise ExportFormatError(
                f"{self.folder}/{STEP_GRAPH} has inputs {sorted(ins)} and outputs {sorted(outs)}; "
                f"meta.json promises inputs {sorted(want_in)} and outputs {sorted(want_out)}"
            )
        shape = ins[STATE_INPUT].shape
        if list(shape[1:]) != list(self.state_shape):
            raise ExportFormatError(
                f"{self.folder}/{STEP_GRAPH} takes a state of shape {shape}; meta.json says "
                f"(B, {self.state_shape[0]}, {self.state_shape[1]})"
            )

    # ----------------------------------------------------------------------- checks
    def initial_state(self, batch: int = 1) -> np.ndarray:
        """The zero state of `batch` sequences: (batch, S, H) float32."""
        if not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
        return np.zeros((int(batch), *self.state_shape), dtype=np.float32)

    def _check_inputs(self, inputs, steps: bool) -> np.ndarray:
        """(B,) ids / (B, in) floats; with steps, (T, B) / (T, B, in)."""
        x = np.asarray(inputs)
        lead = "T, B" if steps else "B"
        if self.kind == "char":
            V = self.meta.vocab_size
            if x.ndim != (2 if steps else 1) or not np.issubdtype(x.dtype, np.integer):
                raise ValueError(
                    f"tokens must be integer ids of shape ({lead}), got shape {x.shape} of "
                    f"{x.dtype}"
                )
            if x.size and (x.min() < 0 or x.max() >= V):
                raise ValueError(f"token ids must lie in [0, {V}), got {x.min()}..{x.max()}")
            x = x.astype(np.int64, copy=False)
        else:
            n = self.meta.input_size
            if (
                x.ndim != (3 if steps else 2)
                or x.shape[-1] != n
                or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer))
            ):
                raise ValueError(
                    f"glimpses must be floats of shape ({lead}, {n}), got shape {x.shape} of "
                    f"{x.dtype}"
                )
            x = x.astype(np.float32, copy=False)
        if x.shape[1 if steps else 0] < 1:
            raise ValueError(f"the batch must hold at least one sequence, got shape {x.shape}")
        return np.ascontiguousarray(x)

    def _check_state(self, state, batch: int) -> np.ndarray:
        if state is None:
            return self.initial_state(batch)
        if isinstance(state, ort.OrtValue):
            return state
        s = np.asarray(state)
        want = (batch, *self.state_shape)
        if s.shape != want or not np.issubdtype(s.dtype, np.floating):
            raise ValueError(
                f"state must be floats of shape (B, S, H) = {want} (slots {self.state_slots}), "
                f"got shape {s.shape} of {s.dtype}"
            )
        return np.ascontiguousarray(s, dtype=np.float32)

    # ------------------------------------------------------------------------ running
    def _run(self, sess: ort.InferenceSession, x: np.ndarray, state, state_on_device: bool = False):
        """One call of a graph. On CUDA: I/O binding, the state output left on the GPU when
        state_on_device (an OrtValue the next call takes as its state input)."""
        if self.device != "cuda":
            if isinstance(state, ort.OrtValue):
                state = state.numpy()
            return tuple(sess.run(None, {self.input_name: x, STATE_INPUT: state}))
        binding = sess.io_binding()
        binding.bind_cpu_input(self.input_name, x)
        if isinstance(state, ort.OrtValue):
            binding.bind_ortvalue_input(STATE_INPUT, state)
        else:
            binding.bind_cpu_input(STATE_INPUT, state)
        binding.bind_output(LOGITS_OUTPUT, "cpu")
        binding.bind_output(STATE_OUTPUT, "cuda", 0)
        sess.run_with_iobinding(binding)
        logits, new_state = binding.get_outputs()
        return logits.numpy(), new_state if state_on_device else new_state.numpy()

    def step(self, inputs, state=None, *, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """One step for a batch: inputs (B,) int ids (char) or (B, 49) floats (glimpse), state
        (B, S, H) or None for zeros. Returns (logits (B, V) float32, new state (B, S, H)).
        check=False skips this method's checks of shapes, types and id range, for a caller that
        builds contiguous int64 / float32 arrays of valid ids itself (the server's scheduler,
        where they cost about as much as sampling at batch 1); onnxruntime still refuses a wrong
        shape or type."""
        if not check:
            return self._run(self._step, inputs, state)
        x = self._check_inputs(inputs, steps=False)
        return self._run(self._step, x, self._check_state(state, x.shape[0]))

    def run(self, inputs, state=None) -> tuple[np.ndarray, np.ndarray]:
        """A whole sequence for a batch: inputs (T, B) ids or (T, B, 49) floats. Returns
        (logits (T, B, V), final state (B, S, H)). Uses the sequence graph when the folder has
        one (in chunks bounding the logits' memory), else the step graph once per step."""
        x = self._check_inputs(inputs, steps=True)
        T, B = x.shape[0], x.shape[1]
        state = self._check_state(state, B)
        logits = np.empty((T, B, self.output_size), dtype=np.float32)
        if self._sequence is not None:
            chunk = max(1, MAX_LOGITS_BYTES // (4 * B * self.output_size))
            for start in range(0, T, chunk):
                logits[start : start + chunk], state = self._run(
                    self._sequence, x[start : start + chunk], state, state_on_device=True
                )
        else:
            for t in range(T):
                logits[t], state = self._run(self._step, x[t], state, state_on_device=True)
        if isinstance(state, ort.OrtValue):
            state = state.numpy()
        return logits, state

    # ------------------------------------------------------------------- task helpers
    def score_ids(self, ids, state=None, *, unknown_chars: int = 0) -> Score:
        """Score a stream of ids: ids[1:] each predicted from the ids before it (ids[0] is
        context only). Char models only."""
        self._require("char", "score_ids")
        ids = self._check_inputs(np.asarray(ids).reshape(-1), steps=False)
        if len(ids) < 2:
            raise ValueError("scoring needs at least two ids: the first is context only")
        logits, final = self.run(ids[:-1, None], state)  # (T-1, 1, V)
        z = logits[:, 0, :].astype(np.float64)
        m = z.max(axis=1, keepdims=True)
        log_norm = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
        each = log_norm - z[np.arange(len(z)), ids[1:]]  # nats per predicted id
        nats = float(each.sum())
        n = len(ids) - 1
        return Score(nats / n / math.log(2), nats, n, unknown_chars, final, each / math.log(2))

    def score(self, text: str) -> Score:
        """Bits per character of `text` under the model, every character scored: the text is
        read from a fresh state after the start symbol (serving.formats.start_id: the begin
        marker, else a newline, else a space), as the server's Score without a session reads
        it. Out-of-vocabulary characters are scored as the unknown id and counted."""
        self._require("char", "score")
        if not text:
            raise ValueError("text to score must not be empty")
        assert self.tokenizer is not None  # every char model has one (ExportMeta.validate)
        enc = self.tokenizer.encode(text)
        ids = np.concatenate([[start_id(self.tokenizer)], enc.ids]).astype(np.int64)
        return self.score_ids(ids, unknown_chars=enc.unknown_chars)

    def classify(self, glimpses) -> np.ndarray:
        """Glimpse models: (20, 49) or (N, 20, 49) glimpse sequences (serving.formats.
        image_to_glimpses) -> the last step's logits, (10,) or (N, 10)."""
        self._require("glimpse", "classify")
        g = np.asarray(glimpses, dtype=np.float32)
        single = g.ndim == 2
        if single:
            g = g[None]
        if g.ndim != 3:
            raise ValueError(
                f"glimpses must be (T, {self.meta.input_size}) or (N, T, {self.meta.input_size}), "
                f"got {g.shape}"
            )
        logits, _ = self.run(np.ascontiguousarray(g.transpose(1, 0, 2)))  # (T, N, 10)
        return logits[-1, 0] if single else logits[-1]

    def _require(self, kind: str, what: str) -> None:
        if self.kind != kind:
            raise ValueError(
                f"{what}() is for {kind} models; this is a {self.kind} model ({self.meta.task})"
            )


def load_model(
    folder: str | Path,
    *,
    providers: str | Sequence = "auto",
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
) -> ExportedModel:
    """Load an exported model folder (training/export.py writes them).

    Checks meta.json (its format version) and the sha256 of every file it lists before anything
    is loaded; a mismatch, a missing file or an unknown version raises ExportFormatError.
    providers: "auto" | "cpu" | "cuda" | a list of onnxruntime providers (see the module doc);
    "auto" runs an int8 folder on the CPU.
    intra_op_threads / inter_op_threads: onnxruntime's thread pools (None or 0: its default,
    one intra-op thread per physical core).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no exported model folder at {folder}")
    meta = ExportMeta.from_folder(folder)
    meta.verify_files(folder)
    tokenizer = None
    if meta.has_tokenizer:
        tokenizer = Tokenizer.from_file(folder / TOKENIZER_FILE)
        if meta.kind == "char" and tokenizer.vocab_size != meta.vocab_size:
            raise ExportFormatError(
                f"{folder}: the tokenizer has {tokenizer.vocab_size} symbols but meta.json says "
                f"vocab_size {meta.vocab_size}"
            )
    opts = _session_options(intra_op_threads, inter_op_threads)
    if meta.precision == "int8" and providers == "auto":
        # int8 graphs are made for the CPU (onnxruntime's dynamic int8 kernels are CPU ones; on
        # CUDA most of such a graph would fall back to the CPU with copies in between).
        providers = "cpu"
    step = _create_session(folder / STEP_GRAPH, providers, opts)
    sequence = None
    if meta.sequence_graph:
        # the same providers as the step graph, so that both run on one device
        sequence = _create_session(folder / SEQUENCE_GRAPH, step.get_providers(), opts)
    model = ExportedModel(folder, meta, tokenizer, step, sequence)
    log.info("loaded %r with providers %s", model, model.providers)
    return model


__all__ = ["PROVIDER_CHOICES", "ExportedModel", "Score", "load_model"]
