"""What the trainer tests share (tests/test_trainer.py, tests/test_trainer_resume.py): the
small stream they train on, the run config they start from, quiet runs, reading and comparing
a run's last weights, and a kill at a chosen step."""

from __future__ import annotations

from pathlib import Path

import torch

from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.testing.data import stream_prepared
from training.trainer import LAST

QUIET = dict(log=lambda *_: None, progress=False)


def prepared_stream(root: Path):
    """training/testing/data.py's character stream, as the trainer tests train on it."""
    return stream_prepared(root, n_train=6000, n_eval=800)


def run_config(**kw) -> TrainConfig:
    """A small character-model run: 12 cells, 2 epochs of batches of 4 x 25, no checkpoints
    between evaluations; `kw` overrides any field."""
    base = dict(
        task="ptb",
        model={"hidden_size": 12},
        batch_size=4,
        seq_len=25,
        epochs=2,
        checkpoint_every=0,
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


def weights_of(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / LAST).model


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Kill(Exception):
    """Stands for a SIGKILL at an arbitrary point: nothing after it runs."""


def kill_at(step):
    def hook(s):
        if s == step:
            raise Kill

    return hook
