"""Checkpoints: what a training run saves and what the exporter reads.

A checkpoint is one file written with torch.save and read back with `weights_only=True`: plain
containers, tensors and bytes, never a pickled module or class. It holds

    format, version          "nlstm-checkpoint", FORMAT_VERSION
    task                     "ptb" | "text8" | "poems" | "mnist" | a test task name
    model_config             ModelConfig.to_dict()
    model                    the model's state_dict
    tokenizer                the sentencepiece model's bytes (text tasks), else None
    train_config             the run's full config (a plain dict), so a run can be resumed
    step, epoch              where training stands
    metrics                  the figures so far (e.g. best valid and the test at that epoch)
    optimizer, scheduler     their state_dicts (None when saved for export only)
    rng                      RNG states (torch CPU/CUDA, numpy, python) and the data position
    extra                    anything else a trainer wants to carry (a plain dict)

Writes are atomic (serving.files, the one atomic-write helper of both sides): the bytes go to
a temporary file in the same folder, are flushed and fsynced, then renamed over the target, so
a kill at any moment leaves either the previous file or the new one, never a torn one. A
SIGKILL before the rename (nothing runs after it) also leaves that temporary file,
`.{name}.XXXXXXXX.tmp`, as large as the file it was to become: `remove_stale_temporaries`
clears them (the trainer calls it when a run starts or resumes).
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# re-exported: the checkpoint's writers and their tests reach them here
from serving.files import atomic_write_bytes, remove_stale_temporaries, umask_mode  # noqa: F401
from training.models import ModelConfig, TaskModel, build_model

FORMAT = "nlstm-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of this project (corrupt, foreign, too new)."""


@dataclass
class Checkpoint:
    task: str
    model_config: ModelConfig
    model: dict[str, torch.Tensor]
    tokenizer: bytes | None = None
    train_config: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    optimizer: dict | None = None
    scheduler: dict | None = None
    rng: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def build_model(self) -> TaskModel:
        """The model with these weights (on the CPU)."""
        model = build_model(self.model_config)
        model.load_state_dict(self.model)
        return model


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> None:
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "task": ckpt.task,
        "model_config": ckpt.model_config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in ckpt.model.items()},
        "tokenizer": ckpt.tokenizer,
        "train_config": ckpt.train_config,
        "step": int(ckpt.step),
        "epoch": int(ckpt.epoch),
        "metrics": ckpt.metrics,
        "optimizer": ckpt.optimizer,
        "scheduler": ckpt.scheduler,
        "rng": ckpt.rng,
        "extra": ckpt.extra,
    }
    atomic_write_bytes(path, lambda f: torch.save(payload, f))


def _first_line(exc: BaseException) -> str:
    """An exception's type and first line, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ours = "nlstm reads the best.pt and last.pt that `nlstm train` writes"
    with path.open("rb") as f:  # torch.save writes a zip archive; a truncated one still starts so
        if f.read(4) != b"PK\x03\x04":
            raise CheckpointError(
                f"{path} is not an nlstm checkpoint: not a file torch.save wrote; {ours}"
            )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message advises weights_only=False, i.e. running the file's pickled code:
        # wrong advice for a file that cannot be one of ours anyway.
        if "weights only" in str(exc).lower():
            raise CheckpointError(
                f"{path} is not an nlstm checkpoint: it holds pickled Python objects (a whole "
                "model, or another program's checkpoint), which nlstm never writes nor loads; "
                f"{ours}"
            ) from None
        raise CheckpointError(
            f"{path} is not a readable nlstm checkpoint (corrupt or truncated): {_first_line(exc)}"
        ) from None
    except Exception as exc:  # torch raises many kinds for a corrupt or foreign file
        raise CheckpointError(
            f"{path} is not a readable nlstm checkpoint (corrupt, truncated or not written by "
            f"`nlstm train`): {_first_line(exc)}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a torch file but not an nlstm checkpoint (expected format {FORMAT!r})"
        )
    version = payload.get("version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this nlstm reads version "
            f"{FORMAT_VERSION}"
        )
    return Checkpoint(
        task=payload["task"],
        model_config=ModelConfig.from_dict(payload["model_config"]),
        model=payload["model"],
        tokenizer=payload.get("tokenizer"),
        train_config=payload.get("train_config") or {},
        step=payload.get("step", 0),
        epoch=payload.get("epoch", 0),
        metrics=payload.get("metrics") or {},
        optimizer=payload.get("optimizer"),
        scheduler=payload.get("scheduler"),
        rng=payload.get("rng") or {},
        extra=payload.get("extra") or {},
    )
