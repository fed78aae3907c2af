"""How a quantized model is measured: its figures on a task's splits and its step's CPU time.

`EvalData` holds what a model is measured on (the validation and test splits, calibration
inputs from the training split) batched as the trainer evaluates; `evaluate` gives an
ExportedModel's figures on a split; `cost` what quantization costs; `step_cpu_us` the CPU time
of a step (one onnxruntime thread, the calling thread's CPU time: other processes on a shared
machine do not inflate it); `local_model` an ExportedModel over a graph not yet in a folder
(a candidate). training/quantize.py and training/quant_choose.py use them. Never imports torch.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.formats import STATE_INPUT, TOKENIZER_FILE, ExportMeta, Tokenizer

if TYPE_CHECKING:  # training.data is imported where it is used
    from training.data.batching import GlimpseBatch, LMBatch

TIMING_BATCHES = (1, 64)


class QuantizationError(RuntimeError):
    """The folder cannot be quantized as asked (wrong input, no data, no graph)."""


# ---------------------------------------------------------------------------------- the data
@dataclass
class EvalData:
    """What a quantized model is measured on: the task's validation and test splits and
    calibration inputs from its training split, batched as the trainer evaluates.

    kind: "stream" (PTB, text8: one id stream, state carried across batches), "sequences"
    (poems: padded rows), "glimpses" (MNIST). splits: training.data.task split objects by name
    ("train", "valid", "test"). tokenizer: the serialized tokenizer the ids were made with
    (char tasks), which must be the folder's."""

    kind: str
    splits: Mapping[str, Any]
    batch_size: int = 32
    seq_len: int = 100
    tokenizer: bytes | None = None
    description: str = ""

    @classmethod
    def for_task(
        cls,
        meta: ExportMeta,
        data_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
    ) -> EvalData:
        """The real splits of the folder's task (training.data.load: prepared when missing)."""
        from training import data

        if meta.task not in data.TASKS:
            raise QuantizationError(
                f"the folder's task {meta.task!r} has no dataset to measure the cost on "
                f"(tasks: {', '.join(data.TASKS)})"
            )
        try:
            prepared = data.load(
                meta.task,
                data_dir=Path(data_dir) if data_dir else None,
                cache_dir=Path(cache_dir) if cache_dir else None,
            )
        except (OSError, data.DownloadError, data.ChecksumError) as exc:
            raise QuantizationError(
                f"the {meta.task} data is needed to measure what quantization costs: {exc}"
            ) from exc
        tok = prepared.tokenizer_path.read_bytes() if prepared.tokenizer_path else None
        return cls(
            kind=prepared.kind,
            splits=prepared.splits,
            batch_size=int(meta.train_config.get("batch_size", 32)),
            seq_len=int(meta.train_config.get("seq_len", 100)),
            tokenizer=tok,
            description=f"{meta.task} (training.data, prepared folder {prepared.path.name})",
        )

    def check_folder(self, folder: Path, meta: ExportMeta) -> None:
        if meta.kind == "char":
            if self.kind == "glimpses":
                raise QuantizationError(f"{folder} is a char model but the data is glimpses")
            if self.tokenizer is not None:
                ours = Tokenizer.from_bytes(self.tokenizer)
                theirs = Tokenizer.from_file(folder / TOKENIZER_FILE)

                def pieces(t: Tokenizer) -> list[str]:
                    return [t.piece(i) for i in range(t.vocab_size)]

                if pieces(ours) != pieces(theirs):
                    raise QuantizationError(
                        f"the data's tokenizer is not {folder}'s: the figures would score other ids"
                    )
        elif self.kind != "glimpses":
            raise QuantizationError(f"{folder} is a glimpse classifier but the data is {self.kind}")

    def batches(self, split: str, limit: int | None = None) -> Iterator[LMBatch | GlimpseBatch]:
        """(x, y, mask or None) per evaluation batch of `split`, at most `limit` batches."""
        from training import data

        s = self.splits[split]
        it: Iterable[LMBatch | GlimpseBatch]
        if self.kind == "stream":
            it = data.lm_eval_batches(np.asarray(s.ids), self.batch_size, self.seq_len)
        elif self.kind == "sequences":
            it = data.sequence_batches(np.asarray(s.ids), np.asarray(s.lengths), self.batch_size)
        else:
            it = data.glimpse_batches(np.asarray(s.glimpses), np.asarray(s.labels), self.batch_size)
        yield from itertools.islice(it, limit)  # limit None: all of them

    def calibration_feeds(self, model, steps: int = 48, warmup: int = 16) -> list[dict]:
        """Inputs of the step graph as it reads real training data: `steps` (x, state) feeds of
        one batch, after `warmup` steps (so the states are the model's own, not zeros)."""
        feeds = []
        b = next(self.batches("train"))
        x = b.x  # (S, B) ids or (20, B, 49)
        state = model.initial_state(x.shape[1])
        for t in range(min(len(x), warmup + steps)):
            xt = np.ascontiguousarray(
                x[t], dtype=np.int64 if self.kind != "glimpses" else np.float32
            )
            if t >= warmup or self.kind == "glimpses":
                feeds.append({model.input_name: xt, STATE_INPUT: state})
            _, state = model.step(xt, state)
        if self.kind != "glimpses" and len(x) < warmup + steps:
            feeds = feeds or [
                {
                    model.input_name: np.ascontiguousarray(x[0], np.int64),
                    STATE_INPUT: model.initial_state(x.shape[1]),
                }
            ]
        return feeds


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def evaluate(model, data: EvalData, split: str, limit: int | None = None) -> dict[str, float]:
    """The figures of an ExportedModel (serving.runtime) on a split, as the trainer computes
    them: char models bits per character (`bpc`), mean NLL in nats (`nll`) and, for sequences,
    perplexity (`ppl`); glimpse models accuracy (`acc`, a fraction) and `nll`."""
    nats, count, correct, state = 0.0, 0, 0, None
    from training.data.batching import GlimpseBatch

    for b in data.batches(split, limit):
        if isinstance(b, GlimpseBatch):  # data.kind == "glimpses"
            logits, _ = model.run(b.x)  # (20, B, 10)
            lp = log_softmax(logits[-1])
            y = np.asarray(b.y)
            nats -= float(lp[np.arange(len(y)), y].sum())
            correct += int((lp.argmax(1) == y).sum())
            count += len(y)
            continue
        carry = data.kind == "stream"
        logits, final = model.run(b.x, state if carry else None)  # (S, B, V)
        lp = log_softmax(logits)
        picked = np.take_along_axis(lp, np.asarray(b.y)[..., None], axis=-1)[..., 0]
        nats -= float(picked[b.mask].sum())
        count += int(b.mask.sum())
        state = final
    if not count:
        raise QuantizationError(f"the {split} split gave nothing to evaluate")
    nll = nats / count
    if data.kind == "glimpses":
        return {"acc": correct / count, "nll": nll, "items": count}
    out = {"bpc": nll / math.log(2), "nll": nll, "items": count}
    if data.kind == "sequences":
        out["ppl"] = math.exp(nll)
    return out


def cost(kind: str, reference: dict[str, float], quantized: dict[str, float]) -> float:
    """What quantization costs on one split: bits per character more (char models) or points of
    accuracy fewer (glimpse models); positive is worse."""
    if kind == "glimpses":
        return (reference["acc"] - quantized["acc"]) * 100.0
    return quantized["bpc"] - reference["bpc"]


# ------------------------------------------------------------------------------------ timing
def step_cpu_us(
    graphs: dict[str, Path],
    meta: ExportMeta,
    batches=TIMING_BATCHES,
    rounds: int = 7,
    seconds: float = 0.15,
) -> dict[str, dict[str, float]]:
    """CPU microseconds per step of each graph at each batch size: one intra-op thread (so the
    calling thread computes), that thread's CPU time, all graphs alternating in `rounds` rounds
    of about `seconds` each; the best round per graph and batch."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.log_severity_level = 3
    sessions = {
        k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        for k, p in graphs.items()
    }
    rng = np.random.default_rng(0)
    best: dict[str, dict[str, float]] = {k: {} for k in graphs}
    for batch in batches:
        if meta.kind == "char":
            x = rng.integers(0, meta.vocab_size, size=batch).astype(np.int64)
        else:
            assert meta.input_size is not None  # ExportMeta requires it of glimpse models
            x = rng.random((batch, meta.input_size), dtype=np.float32)
        state = (rng.standard_normal((batch, *meta.state_shape)) * 0.5).astype(np.float32)
        feed = {meta.input_name: x, STATE_INPUT: state}
        reps = {}
        for k, s in sessions.items():  # warm up, and size each round to ~`seconds` of CPU
            s.run(None, feed)
            t0 = time.thread_time()
            s.run(None, feed)
            reps[k] = max(3, int(seconds / max(time.thread_time() - t0, 1e-5)))
        for _ in range(rounds):
            for k, s in sessions.items():
                t0 = time.thread_time()
                for _ in range(reps[k]):
                    s.run(None, feed)
                us = (time.thread_time() - t0) / reps[k] * 1e6
                best[k][str(batch)] = min(best[k].get(str(batch), math.inf), us)
    return best


def local_model(
    model_folder: Path, graph: Path, meta: ExportMeta, providers: str = "cpu", threads: int = 1
):
    """An ExportedModel over `graph` with `meta`'s description (a candidate not yet a folder)."""
    from serving.runtime import ExportedModel, _create_session, _session_options

    sess = _create_session(graph, providers, _session_options(threads, 1))
    tok = Tokenizer.from_file(model_folder / TOKENIZER_FILE) if meta.has_tokenizer else None
    return ExportedModel(model_folder, meta, tok, sess, None)
