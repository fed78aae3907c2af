"""A run's bookkeeping: where training stands, the run folder's files, resume and RNG states.

A run folder (training/run_folder.py names its files) holds `metrics.jsonl` (a "run" line with
the config, seed and versions, then one "eval" line per evaluation, and a "resume" line per
resume), `last.pt` (written atomically at every evaluation and every `checkpoint_every` steps;
what `--resume` continues from) and `best.pt` (the weights of the best validation figure so far,
without the optimizer). docs/training.md describes them. A SIGKILL in the middle of writing one
of them leaves its temporary file (`.last.pt.XXXXXXXX.tmp`, as large as a checkpoint) beside
it; a run that starts or resumes in the folder removes those.

Resume is exact: checkpoints are taken on batch boundaries and hold the weights, the optimizer,
the RNG states, the data position (epoch, next batch), the carried recurrent state and the
running training sums (`RunState`, under the checkpoint's extra["trainer"]); the data order is
a pure function of (seed, epoch). A CPU run killed at any moment and resumed ends with the same
weights, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving.files import atomic_write_bytes
from training.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from training.config import RESUMABLE, ConfigError, TrainConfig, config_differences, flatten
from training.distributed import Dist
from training.models import ModelConfig, count_parameters
from training.run_folder import BEST, LAST, METRICS, existing_run_files

# The version of extra["trainer"]: a checkpoint with another one can be exported, not resumed.
TRAINER_STATE_VERSION = 1


# -------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(
            (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
        )
    if "python" in state:
        random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------ what a run records
def hardware(device: torch.device, world: int = 1) -> dict[str, Any]:
    """What the run trains on, for metrics.jsonl, checkpoints and the exports made from them."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                name = next(
                    (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                    name,
                )
        except OSError:
            pass
    return {
        "device": str(device),
        "name": name,
        "processes": world,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        nlstm = version("nlstm")
    except PackageNotFoundError:  # a bare checkout, not installed
        nlstm = "unknown"
    return {
        "nlstm": nlstm,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "",
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))


# ----------------------------------------------------------------------------- metrics file
def read_metrics(run_dir: str | os.PathLike) -> tuple[dict | None, list[dict]]:
    """(the run record, the evaluation records) of a run folder's metrics.jsonl."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS
    run, evals = None, []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n} is not a JSON line") from None
            if rec.get("type") == "run":
                run = rec
            elif rec.get("type") == "eval":
                evals.append(rec)
    return run, evals


class MetricsFile:
    """metrics.jsonl: appended one flushed, fsynced line at a time. On resume it is cut back to
    the lines the checkpoint knew, so a kill between a line and its checkpoint leaves no
    duplicate."""

    def __init__(self, path: Path):
        self.path = path
        self.lines = 0

    def reset(self, keep: int) -> None:
        kept = []
        if self.path.exists():
            kept = self.path.read_text(encoding="utf-8").splitlines(keepends=True)[:keep]
        if len(kept) < keep:
            raise CheckpointError(
                f"{self.path} has {len(kept)} lines but the checkpoint expects {keep}: the "
                "run folder's metrics were changed or truncated"
            )
        atomic_write_bytes(self.path, "".join(kept).encode())
        self.lines = keep

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.lines += 1


# --------------------------------------------------------------------------- the run's state
@dataclass
class RunState:
    """Where training stands: all of it goes into last.pt (extra["trainer"])."""

    running: torch.Tensor  # (3,) float64 since the last evaluation: summed NLL, targets, correct
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs completed
    batch: int = 0  # next batch of the current epoch
    carry: Any = None  # carried recurrent state of this rank's rows (streams)
    train_seconds: float = 0.0  # training time since the last evaluation
    elapsed: float = 0.0  # training + evaluation time of the whole run
    last_eval_step: int = -1
    best: dict[str, dict[str, Any]] = field(default_factory=dict)  # per figure: valid, test, when
    last_record: dict[str, Any] = field(default_factory=dict)  # the last "eval" line
    saved_step: int | None = None  # the step last.pt holds, once written or restored here

    @classmethod
    def fresh(cls, device: torch.device) -> RunState:
        return cls(running=torch.zeros(3, dtype=torch.float64, device=device))


class RunFiles:
    """One run folder's files for one process: metrics.jsonl, last.pt and best.pt, how a
    RunState and the weights go into them, and how a resumed or warm-started run reads them
    back. Only rank 0 writes; every rank takes part in the collectives of `save`."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: TrainConfig,
        model_config: ModelConfig,
        tokenizer: bytes | None,
        dist: Dist,
        log: Callable[[str], None],
    ):
        self.dir = Path(run_dir)
        self.config, self.model_config, self.tokenizer = config, model_config, tokenizer
        self.dist, self.log = dist, log
        self.metrics = MetricsFile(self.dir / METRICS)

    # ------------------------------------------------------------------------- starting
    def existing(self) -> list[str]:
        return existing_run_files(self.dir)

    def remove_stale_temporaries(self) -> None:
        """Delete what a SIGKILL mid-write left of the folder's atomic writes (checkpoints,
        metrics.jsonl): nothing else writes them now, so no such file is a live write's."""
        for path in remove_stale_temporaries(self.dir, (LAST, BEST, METRICS)):
            self.log(f"removed {path.name}: the temporary file of a write killed before it ended")

    def start(self, model: torch.nn.Module, n_batches: int, device: torch.device) -> None:
        """A fresh run: metrics.jsonl holds its "run" line only."""
        if not self.dist.main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics.reset(0)
        self.metrics.append(
            {
                "type": "run",
                "task": self.config.task,
                "seed": self.config.seed,
                "config": self.config.to_dict(),
                "model_config": self.model_config.to_dict(),
                "params": count_parameters(model),
                "train_batches_per_epoch": n_batches,
                "device": str(device),
                "world_size": self.dist.world,
                "versions": versions(),
                "hardware": hardware(device, self.dist.world),
                "started": _now(),
            }
        )

    def record(self, rec: dict[str, Any]) -> None:
        if self.dist.main:
            self.metrics.append(rec)

    # --------------------------------------------------------------------------- saving
    def save(
        self,
        name: str,
        at: RunState,
        model: torch.nn.Module,
        device: torch.device,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Write `name` (LAST with the optimizer, BEST without): the weights and `at`."""
        # Collectives first, on every rank; then rank 0 writes.
        carry = self.dist.gather_rows(at.carry)
        running = self.dist.sum(at.running.clone())  # saved as rank 0's; other ranks resume from 0
        if not self.dist.main:
            return
        trainer_state = {
            "version": TRAINER_STATE_VERSION,
            "position": {"epoch": at.epoch, "batch": at.batch},
            "carry": carry,
            "running": running.cpu(),
            "train_seconds": at.train_seconds,
            "elapsed": at.elapsed,
            "last_eval_step": at.last_eval_step,
            "best": at.best,
            "last_record": at.last_record,
            "metrics_lines": self.metrics.lines,
            "world_size": self.dist.world,
        }
        save_checkpoint(
            Checkpoint(
                task=self.config.task,
                model_config=self.model_config,
                model=model.state_dict(),
                tokenizer=self.tokenizer,
                train_config=self.config.to_dict(),
                step=at.step,
                epoch=at.epoch,
                metrics=_jsonable({**at.last_record}),
                optimizer=_to_cpu(optimizer.state_dict()) if optimizer is not None else None,
                rng=rng_state(),
                extra={"trainer": trainer_state, "hardware": hardware(device, self.dist.world)},
            ),
            self.dir / name,
        )

    # ------------------------------------------------------------------------- resuming
    def resume(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
    ) -> RunState:
        """Load last.pt into `model`, `optimizer` and the RNGs and return where it stood; checks
        that it was written by this trainer for this config (up to RESUMABLE), model and data."""
        path = self.dir / LAST
        ckpt = load_checkpoint(path, map_location="cpu")
        ts = ckpt.extra.get("trainer")
        if not isinstance(ts, dict) or ts.get("version") != TRAINER_STATE_VERSION:
            raise CheckpointError(
                f"{path} holds no training position (not written by `nlstm train`, or by another "
                "version of it): it can be exported but not resumed"
            )
        if ckpt.optimizer is None:
            raise CheckpointError(f"{path} has no optimizer state and cannot be resumed")
        self._check_same_run(ckpt, path)
        with torch.no_grad():
            model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.optimizer)
        set_rng_state(ckpt.rng)
        at = RunState(
            running=ts["running"].to(device, torch.float64),
            step=int(ckpt.step),
            epoch=int(ts["position"]["epoch"]),
            batch=int(ts["position"]["batch"]),
            train_seconds=float(ts["train_seconds"]),
            elapsed=float(ts["elapsed"]),
            last_eval_step=int(ts["last_eval_step"]),
            best=ts["best"],
            last_record=ts["last_record"],
            saved_step=int(ckpt.step),
        )
        if ts["carry"] is not None:  # the global state: this rank takes its rows
            rows = self.dist.rows(self.config.batch_size)
            at.carry = tuple(tuple(t[rows].to(device) for t in layer) for layer in ts["carry"])
        if not self.dist.main:
            at.running.zero_()
        c = self.config
        finished = at.epoch >= c.epochs or bool(c.max_steps and at.step >= c.max_steps)
        if self.dist.main:
            self.metrics.reset(int(ts["metrics_lines"]))
        if self.dist.main and not finished:  # resuming a finished run records nothing
            self.metrics.append(
                {
                    "type": "resume",
                    "step": at.step,
                    "epoch": at.epoch,
                    "batch": at.batch,
                    "world_size": self.dist.world,
                    "versions": versions(),
                    "time": _now(),
                }
            )
        self.log(f"resumed {self.dir} at step {at.step} (epoch {at.epoch}, batch {at.batch})")
        return at

    def _check_same_run(self, ckpt: Checkpoint, path: Path) -> None:
        try:
            saved = TrainConfig.from_dict(ckpt.train_config)
        except ValueError as exc:
            raise CheckpointError(
                f"{path} holds a config this version cannot read: {exc}"
            ) from None
        diff = config_differences(saved, self.config)
        if diff:
            a, b = flatten(saved.to_dict()), flatten(self.config.to_dict())
            details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff)
            raise ConfigError(
                f"cannot resume {self.dir}: the config differs from the checkpoint's in "
                f"{details}. Only {', '.join(RESUMABLE)} may change on resume"
            )
        if ckpt.model_config != self.model_config:
            raise CheckpointError(
                f"{path} holds a {ckpt.model_config} but this config and data build a "
                f"{self.model_config}"
            )
        if ckpt.tokenizer != self.tokenizer:
            raise CheckpointError(
                f"{path} was trained with another tokenizer than the {self.config.task} data "
                "found now (the prepared data changed): resuming would mix vocabularies"
            )

    def warm_start(self, path: str, model: torch.nn.Module) -> None:
        """Load the weights of checkpoint `path` into the fresh model (init_from: every rank
        reads the same file, so DDP's replicas stay equal)."""
        ckpt = load_checkpoint(path, map_location="cpu")
        problems = []
        if ckpt.task != self.config.task:
            problems.append(f"its task is {ckpt.task!r}, this run's {self.config.task!r}")
        if ckpt.model_config != self.model_config:
            diff = sorted(
                k
                for k, v in self.model_config.to_dict().items()
                if ckpt.model_config.to_dict().get(k) != v
            )
            problems.append(f"its model differs in {', '.join(diff)}")
        if ckpt.tokenizer != self.tokenizer:
            problems.append(
                "its tokenizer differs from this run's data (the same ids would mean other "
                "characters)"
            )
        if problems:
            raise ConfigError(f"init_from={path} cannot start this run: {'; '.join(problems)}")
        with torch.no_grad():
            model.load_state_dict(ckpt.model)
        self.log(f"initialised from the weights of {path} (its step {ckpt.step})")


__all__ = [
    "TRAINER_STATE_VERSION",
    "MetricsFile",
    "RunFiles",
    "RunState",
    "hardware",
    "read_metrics",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "versions",
]
