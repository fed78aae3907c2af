"""Task kinds (training/tasks.py): every data task has one, and a new kind trains through the
trainer unchanged (the worked example of docs/training.md, "Adding a task")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from serving.formats import CHAR_INPUT, GLIMPSE_INPUT
from training import data as data_mod
from training.config import TrainConfig
from training.models import ModelConfig
from training.tasks import (
    MODEL_KINDS,
    TASK_KINDS,
    BatchLoss,
    SequencesTask,
    model_kind,
    task_kind,
)
from training.testing.data import sequences_prepared
from training.trainer import read_metrics, train

QUIET = {"log": lambda *_: None, "progress": False}


def test_every_data_task_has_a_kind_and_every_kind_a_model_kind():
    for name, task in data_mod.TASKS.items():
        kind = task_kind(task.kind)
        assert kind.name == task.kind and kind.primary in kind.figures, name
        assert model_kind(kind.model.name) is kind.model
    with pytest.raises(ValueError, match="unknown data kind 'tree'; expected one of"):
        task_kind("tree")
    with pytest.raises(ValueError, match="unknown model kind 'pixel'"):
        model_kind("pixel")


def test_model_kinds_own_the_exported_input():
    assert (
        MODEL_KINDS["char"].input_spec == CHAR_INPUT
        and MODEL_KINDS["glimpse"].input_spec == GLIMPSE_INPUT
    )
    g = torch.Generator().manual_seed(0)
    char = ModelConfig(kind="char", vocab_size=7, hidden_size=4)
    x = model_kind("char").example_input(char, (3, 2), g)
    assert x.shape == (3, 2) and x.dtype == torch.int64 and int(x.min()) >= 0 and int(x.max()) < 7
    glimpse = ModelConfig(kind="glimpse", hidden_size=4)
    x = model_kind("glimpse").example_input(glimpse, (2,), g)
    assert x.shape == (2, 49) and x.dtype == torch.float32
    assert model_kind("char").meta_fields(char) == {
        "vocab_size": 7,
        "input_size": None,
        "num_classes": None,
    }
    with pytest.raises(ValueError, match="exported with its tokenizer"):
        model_kind("char").check_tokenizer(char, None)
    model_kind("glimpse").check_tokenizer(glimpse, None)  # a classifier ships none


def test_glimpse_targets_and_figures():
    kind = task_kind("glimpses")
    split = data_mod.GlimpseSplit(np.zeros((10, 20, 49), np.float32), np.arange(10, dtype=np.uint8))
    batch = next(iter(kind.eval_batches(split, TrainConfig(task="mnist", batch_size=8))))
    assert kind.targets(batch) == 8 and kind.targets(batch, slice(2, 5)) == 3
    assert (
        kind.figures_of(2.0, 4, 3) == {"nll": 0.5, "acc": 0.75} and kind.figures_of(0.0, 0, 0) == {}
    )
    assert (
        kind.better("acc", 0.8, 0.7)
        and kind.better("nll", 0.1, 0.2)
        and kind.better("nll", 5.0, None)
    )


# --------------------------------------------------------------- the worked example (docs)
class EndingsTask(SequencesTask):
    """Padded sequences scored on their last character only (say, a line's rhyme): the same
    batches and model as the poems, another loss and other figures."""

    name = "endings"
    figures = ("nll", "acc")
    primary = "acc"
    higher_is_better = frozenset({"acc"})

    def targets(self, batch, rows=slice(None)):
        return int(batch.mask[:, rows].any(axis=0).sum())  # one per sequence

    def loss(self, model, batch, rows, state, device, autocast):
        x = torch.from_numpy(np.ascontiguousarray(batch.x[:, rows])).to(device)  # (S, b)
        last = torch.from_numpy(batch.mask[:, rows].sum(axis=0) - 1).to(device)  # (b,) last target
        y = torch.from_numpy(np.ascontiguousarray(batch.y[:, rows])).to(device)  # (S, b)
        with autocast():
            logits, _ = model(x)  # (S, b, V)
        b = torch.arange(len(last), device=device)
        final = logits[last, b].float()  # (b, V): the logits of each sequence's last target
        target = y[last, b]  # (b,)
        nll = F.cross_entropy(final, target, reduction="sum")
        return BatchLoss(nll, (final.argmax(-1) == target).sum(), len(last), None)

    def figures_of(self, nll, count, correct):
        return {"nll": nll / count, "acc": correct / count} if count > 0 else {}


def test_a_new_kind_trains_through_the_unchanged_trainer(tmp_path, monkeypatch):
    monkeypatch.setitem(TASK_KINDS, "endings", EndingsTask())
    poems = sequences_prepared(tmp_path / "data", n_train=120, n_eval=24)
    prepared = data_mod.Prepared(
        poems.task,
        "endings",
        poems.path,
        poems.meta,
        poems.vocab_size,
        None,
        poems.tokenizer_path,
        poems.splits,
    )
    cfg = TrainConfig(
        task="poems",
        model={"hidden_size": 8},
        batch_size=12,
        epochs=2,
        checkpoint_every=0,
        seed=1,
        optimizer={"lr": 0.01},
    )
    summary = train(cfg, tmp_path / "run", prepared=prepared, **QUIET)
    run, evals = read_metrics(tmp_path / "run")
    assert run["model_config"]["kind"] == "char"  # the kind's model
    for e in evals:
        assert {"train_acc", "valid_nll", "valid_acc", "best_valid_acc", "best_test_acc"} <= set(e)
        assert 0 <= e["valid_acc"] <= 1 and math.isfinite(e["valid_nll"])
    # best.pt follows the primary figure, accuracy, which is higher-is-better
    assert summary["best"]["acc"]["valid"] == max(e["valid_acc"] for e in evals)
    assert evals[-1]["best_step"] == summary["best"]["acc"]["step"]
