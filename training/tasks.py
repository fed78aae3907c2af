"""Task kinds: everything the trainer and the exporter know about one shape of task.

The trainer and the exporter know no task (minGPT's trainer "has nothing to do with GPT"). What
differs between tasks lives in one object per kind, looked up by name:

    TaskKind  (training.data's `Prepared.kind`: "stream", "sequences", "glimpses")
        its batches (training epochs, evaluation passes, a limit on a split's items), its loss
        and the number of targets a batch's mean divides by, whether the recurrent state
        carries across batches (truncated BPTT), its figures and the primary one that picks
        best.pt, the unit a progress bar counts, and the model it trains (`model`)
    ModelKind (ModelConfig.kind: "char", "glimpse")
        the fields a task's data fills into the ModelConfig, the exported graph's input (name,
        dtype), random example inputs for tracing and parity checks, and the ExportMeta fields

    kind        data            model(x (T, B, ...)) -> (T, B, out)   loss, figures
    stream      ptb, text8      char: tokens (S, B) int64             NLL of every target; bpc;
                                                                      state carried
    sequences   poems           char: tokens (L-1, B) int64           NLL, padding masked out; ppl
    glimpses    mnist           glimpse: (20, B, 49) float32          NLL of the LAST step's
                                                                      logits; nll and acc

Adding a task is one data module (training/data/<task>.py with a `Task` whose `kind` names a
kind here, and a Split type when none fits) plus, when no kind fits, one TaskKind subclass
registered in TASK_KINDS; docs/training.md walks through an example.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from serving.formats import CHAR_INPUT, GLIMPSE_INPUT, Tokenizer
from training import data as data_mod
from training.model_config import ModelConfig

IGNORE = -100  # the target id that cross_entropy skips (padding)


# -------------------------------------------------------------------------------- model kinds
class ModelKind:
    """What a model kind means to the exporter: the graph's input and its example values."""

    name: str
    input_spec: tuple[str, str]  # (the exported graph's input name, its dtype)

    def example_input(self, config: ModelConfig, lead: tuple[int, ...], generator) -> Tensor:
        """Random inputs of shape `lead` + the per-step shape, for tracing and parity checks."""
        raise NotImplementedError

    def meta_fields(self, config: ModelConfig) -> dict[str, Any]:
        """ExportMeta's vocab_size, input_size and num_classes (None where they do not apply)."""
        raise NotImplementedError

    def check_tokenizer(self, config: ModelConfig, tokenizer: bytes | None) -> None:
        """ValueError when the tokenizer an export would ship does not fit the model."""


class CharModel(ModelKind):
    """A character language model: token ids in, logits over the vocabulary out."""

    name = "char"
    input_spec = CHAR_INPUT

    def example_input(self, config, lead, generator):
        return torch.randint(0, config.vocab_size, lead, generator=generator)  # lead, int64

    def meta_fields(self, config):
        return {"vocab_size": config.vocab_size, "input_size": None, "num_classes": None}

    def check_tokenizer(self, config, tokenizer):
        if tokenizer is None:
            raise ValueError(
                "a char model is exported with its tokenizer (the checkpoint has none): the "
                "vocabulary must travel with the weights"
            )
        vocab = Tokenizer.from_bytes(tokenizer).vocab_size
        if vocab != config.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab} symbols but the model's vocab_size is "
                f"{config.vocab_size}"
            )


class GlimpseModel(ModelKind):
    """A glimpse classifier: input_size floats per step in, class logits out."""

    name = "glimpse"
    input_spec = GLIMPSE_INPUT

    def example_input(self, config, lead, generator):
        return torch.rand(*lead, config.input_size, generator=generator)  # (*lead, in) float32

    def meta_fields(self, config):
        return {
            "vocab_size": None,
            "input_size": config.input_size,
            "num_classes": config.num_classes,
        }


MODEL_KINDS: dict[str, ModelKind] = {k.name: k for k in (CharModel(), GlimpseModel())}


def model_kind(name: str) -> ModelKind:
    """The ModelKind called `name` (a ModelConfig's kind)."""
    try:
        return MODEL_KINDS[name]
    except KeyError:
        raise ValueError(
            f"unknown model kind {name!r}; expected one of {tuple(MODEL_KINDS)}"
        ) from None


# --------------------------------------------------------------------------------- task kinds
class BatchLoss(NamedTuple):
    """One rank's rows of a batch through the model."""

    nll: Tensor  # () summed NLL in nats, attached to the graph
    correct: Tensor  # () correct predictions (0 where the task counts none)
    targets: int  # the targets of these rows (what the NLL sums over)
    state: Any  # the final recurrent state (attached; None where it does not carry)


class TaskKind:
    """One shape of task: how its data is batched, scored and summed up (see the module doc)."""

    name: str
    model: ModelKind
    figures: tuple[str, ...]  # what an evaluation reports
    primary: str  # the figure whose best validation value picks best.pt
    higher_is_better: frozenset[str] = frozenset()
    carries_state: bool = False  # batch k+1 continues batch k's rows (truncated BPTT)
    unit: str = "items"  # what the progress bar counts per second

    # ---- the model's data-given fields
    def model_fields(self, vocab_size: int, num_classes: int | None) -> dict[str, Any]:
        """What the prepared data fills into the run's ModelConfig."""
        raise NotImplementedError

    # ---- batches
    def limit(self, split, n: int):
        """The first n items of a split (all of it when n is 0)."""
        raise NotImplementedError

    def n_train_batches(self, split, config) -> int:
        raise NotImplementedError

    def train_batches(self, split, config, epoch: int, start: int) -> Iterable:
        """Epoch `epoch`'s batches from batch `start` on: a pure function of (seed, epoch)."""
        raise NotImplementedError

    def eval_batches(self, split, config) -> Iterable:
        """Every item of the split once, in order."""
        raise NotImplementedError

    # ---- loss
    def batch_size(self, batch) -> int:
        return batch.y.shape[-1]

    def targets(self, batch, rows: slice = slice(None)) -> int:
        """How many targets `rows` of a batch have (all rows: what the mean loss divides by)."""
        raise NotImplementedError

    def loss(
        self, model: nn.Module, batch, rows: slice, state, device, autocast: Callable
    ) -> BatchLoss:
        """Summed NLL, correct predictions and the new state of this rank's `rows`. `state` is
        the recurrent state to start from (None: zeros)."""
        raise NotImplementedError

    # ---- figures
    def figures_of(self, nll: float, count: float, correct: float) -> dict[str, float]:
        """The figures from summed NLL (nats), targets and correct predictions."""
        raise NotImplementedError

    def better(self, figure: str, new: float, old: float | None) -> bool:
        if old is None:
            return True
        return new > old if figure in self.higher_is_better else new < old


def _rows(array: np.ndarray, rows: slice, device) -> Tensor:
    """The batch columns `rows` of a sequence-first array, as a tensor on `device`."""
    return torch.from_numpy(np.ascontiguousarray(array[:, rows])).to(device)


class _CharTask(TaskKind):
    """Shared by the character tasks: (S, B) token batches with a target mask (LMBatch)."""

    model = MODEL_KINDS["char"]
    unit = "chars"

    def model_fields(self, vocab_size, num_classes):
        return {"kind": self.model.name, "vocab_size": vocab_size}

    def targets(self, batch, rows=slice(None)):
        return int(batch.mask[:, rows].sum())

    def loss(self, model, batch, rows, state, device, autocast):
        x = _rows(batch.x, rows, device)  # (S, b)
        targets = np.where(batch.mask[:, rows], batch.y[:, rows], IGNORE)  # (S, b), padding ignored
        y = torch.from_numpy(targets).to(device)
        with autocast():
            logits, state = model(x, state)  # (S, b, V)
        nll = F.cross_entropy(
            logits.float().flatten(0, 1), y.flatten(), reduction="sum", ignore_index=IGNORE
        )
        return BatchLoss(nll, nll.new_zeros(()), self.targets(batch, rows), state)


class StreamTask(_CharTask):
    """One id stream (PTB, text8): contiguous rows read left to right, the state carried
    across batches; bits per character."""

    name = "stream"
    figures = ("bpc",)
    primary = "bpc"
    carries_state = True

    def limit(self, split, n):
        return split if not n or n >= len(split) else data_mod.StreamSplit(split.ids[:n])

    def n_train_batches(self, split, config):
        return len(data_mod.lm_batches(split.ids, config.batch_size, config.seq_len))

    def train_batches(self, split, config, epoch, start):
        # contiguous rows, read left to right: never shuffled
        return data_mod.lm_batches(split.ids, config.batch_size, config.seq_len, start=start)

    def eval_batches(self, split, config):
        # every character but the first (it has no context) is a target exactly once
        return data_mod.lm_eval_batches(split.ids, config.batch_size, config.seq_len)

    def figures_of(self, nll, count, correct):
        return {"bpc": nll / count / math.log(2)} if count > 0 else {}


class _ItemsTask(TaskKind):
    """Independent items (padded sequences, glimpse images) in a split of two parallel arrays,
    shuffled per epoch. A subclass names the arrays, the split type and the batching function."""

    split_fields: tuple[str, str]
    split_type: Callable[..., Any]
    batches: Callable[..., Iterable]

    def _arrays(self, split) -> tuple[np.ndarray, np.ndarray]:
        first, second = self.split_fields
        return getattr(split, first), getattr(split, second)

    def limit(self, split, n):
        if not n or n >= len(split):
            return split
        return self.split_type(*(a[:n] for a in self._arrays(split)))

    def n_train_batches(self, split, config):
        return data_mod.num_batches(len(split), config.batch_size)

    def train_batches(self, split, config, epoch, start):
        return self.batches(
            *self._arrays(split),
            config.batch_size,
            shuffle=True,
            seed=config.seed,
            epoch=epoch,
            start=start,
        )

    def eval_batches(self, split, config):
        return self.batches(*self._arrays(split), config.batch_size)


class SequencesTask(_CharTask, _ItemsTask):
    """Independent padded sequences (the poems), shuffled per epoch; perplexity per character."""

    name = "sequences"
    figures = ("ppl",)
    primary = "ppl"
    split_fields = ("ids", "lengths")
    split_type = data_mod.SequenceSplit
    batches = staticmethod(data_mod.sequence_batches)

    def figures_of(self, nll, count, correct):
        return {"ppl": math.exp(nll / count)} if count > 0 else {}


class GlimpsesTask(_ItemsTask):
    """Glimpse sequences with one label each (MNIST): the last step's logits are the prediction;
    NLL and accuracy (a fraction), the NLL picking best.pt."""

    name = "glimpses"
    model = MODEL_KINDS["glimpse"]
    figures = ("nll", "acc")
    primary = "nll"
    higher_is_better = frozenset({"acc"})
    unit = "images"
    split_fields = ("glimpses", "labels")
    split_type = data_mod.GlimpseSplit
    batches = staticmethod(data_mod.glimpse_batches)

    def model_fields(self, vocab_size, num_classes):
        return {"kind": self.model.name, "num_classes": num_classes or 10}

    def targets(self, batch, rows=slice(None)):
        return len(batch.y[rows])  # one label per image

    def loss(self, model, batch, rows, state, device, autocast):
        x = _rows(batch.x, rows, device)  # (20, b, 49)
        y = torch.from_numpy(np.ascontiguousarray(batch.y[rows])).to(device)  # (b,)
        with autocast():
            logits, _ = model(x)  # (20, b, 10); every image starts from a zero state
        last = logits[-1].float()  # (b, 10): the prediction is the last glimpse's output
        nll = F.cross_entropy(last, y, reduction="sum")
        return BatchLoss(nll, (last.argmax(-1) == y).sum(), len(y), None)

    def figures_of(self, nll, count, correct):
        return {"nll": nll / count, "acc": correct / count} if count > 0 else {}


TASK_KINDS: dict[str, TaskKind] = {
    k.name: k for k in (StreamTask(), SequencesTask(), GlimpsesTask())
}


class TaskData:
    """The batches of a prepared task for one config: training epochs and evaluation passes."""

    def __init__(self, prepared, config):
        self.kind: TaskKind = task_kind(prepared.kind)
        self.config = config
        self.train = self.kind.limit(prepared.splits["train"], config.max_train_items)
        self.eval = {
            s: self.kind.limit(prepared.splits[s], config.max_eval_items) for s in ("valid", "test")
        }

    def n_train_batches(self) -> int:
        return self.kind.n_train_batches(self.train, self.config)

    def train_batches(self, epoch: int, start: int):
        """Epoch `epoch`'s batches from batch `start` on: a pure function of (seed, epoch)."""
        return self.kind.train_batches(self.train, self.config, epoch, start)

    def eval_batches(self, split: str):
        """Every item of `split` once, in order (streams: every character but the first)."""
        return self.kind.eval_batches(self.eval[split], self.config)


def task_kind(name: str) -> TaskKind:
    """The TaskKind called `name` (a prepared task's kind)."""
    try:
        return TASK_KINDS[name]
    except KeyError:
        raise ValueError(
            f"unknown data kind {name!r}; expected one of {tuple(TASK_KINDS)}"
        ) from None


__all__ = [
    "IGNORE",
    "MODEL_KINDS",
    "TASK_KINDS",
    "BatchLoss",
    "CharModel",
    "GlimpseModel",
    "GlimpsesTask",
    "ModelKind",
    "SequencesTask",
    "StreamTask",
    "TaskData",
    "TaskKind",
    "model_kind",
    "task_kind",
]
