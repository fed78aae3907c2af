"""The training loop: batches, truncated BPTT, evaluation, metrics, checkpoints, resume and DDP.

The trainer does not know which model it trains (the config's [model] section picks it through
`build_model`). It knows the three shapes of data (training.data's `Prepared.kind`):

    stream     ptb, text8   model(tokens (S, B)) -> logits (S, B, V); state carried across
                            batches (truncated BPTT); figure: bits per character (bpc)
    sequences  poems        model(tokens (L-1, B)) -> logits, padding masked out of the loss;
                            figure: perplexity per character (ppl)
    glimpses   mnist        model(glimpses (20, B, 49)) -> logits (20, B, 10), the LAST step is
                            the prediction; figures: NLL (nll) and accuracy (acc, a fraction)

A run folder holds `metrics.jsonl` (a "run" line with the config, seed and versions, then one
"eval" line per evaluation), `last.pt` (written atomically at every evaluation and every
`checkpoint_every` steps; what `--resume` continues from) and `best.pt` (the weights of the best
validation figure so far, without the optimizer). docs/training.md describes them. A SIGKILL
in the middle of writing one of them leaves its temporary file (`.last.pt.XXXXXXXX.tmp`, as
large as a checkpoint) beside it; a run that starts or resumes in the folder removes those.

Resume is exact: checkpoints are taken on batch boundaries and hold the weights, the optimizer,
the RNG states, the data position (epoch, next batch), the carried recurrent state and the
running training sums; the data order is a pure function of (seed, epoch). A CPU run killed at
any moment and resumed ends with the same weights, bit for bit, as an uninterrupted run.

Several processes (`torchrun --nproc_per_node=N -m training.cli train ...`) train with
DistributedDataParallel: every rank builds the same global batch and takes a disjoint,
contiguous block of its rows; the loss is scaled so that DDP's gradient average equals the
gradient of the global batch's mean loss. Evaluation is sharded the same way and its sums are
all-reduced.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from training import data as data_mod
from training.checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from training.config import (
    RESUMABLE,
    ConfigError,
    TrainConfig,
    config_differences,
    flatten,
    model_config_for,
)
from training.models import build_model, count_parameters
from training.run_folder import BEST, LAST, METRICS, existing_run_files, refuse_existing_run

TRAINER_STATE_VERSION = 1
IGNORE = -100  # target id that cross_entropy skips (padding)

# Per data kind: the figures an evaluation reports, the one that picks best.pt, and the
# direction in which each figure improves.
FIGURES = {"stream": ("bpc",), "sequences": ("ppl",), "glimpses": ("nll", "acc")}
PRIMARY = {"stream": "bpc", "sequences": "ppl", "glimpses": "nll"}
HIGHER_IS_BETTER = {"acc"}


# ----------------------------------------------------------------------------------- figures
def figures(kind: str, nll: float, count: float, correct: float) -> dict[str, float]:
    """The task's figures from summed NLL (nats), the number of targets and correct predictions."""
    if count <= 0:
        return {}
    mean = nll / count
    if kind == "stream":
        return {"bpc": mean / math.log(2)}
    if kind == "sequences":
        return {"ppl": math.exp(mean)}
    return {"nll": mean, "acc": correct / count}


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


# ------------------------------------------------------------------------------ distribution
@dataclass(frozen=True)
class Dist:
    """Where this process sits in a (possibly one-process) data-parallel run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's contiguous block of n batch rows (blocks differ by at most one row)."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)


def dist_from_env() -> Dist:
    """This process's place from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(pref: str, local_rank: int = 0, world: int = 1) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={pref} but CUDA is not available; use device=cpu or auto")
        if pref == "cuda":
            pref = f"cuda:{local_rank}" if world > 1 else "cuda"
    return torch.device(pref)


# --------------------------------------------------------------------------------------- data
def _limit(split, n: int):
    """The first n items of a split (all of it when n is 0)."""
    if not n or n >= len(split):
        return split
    if isinstance(split, data_mod.StreamSplit):
        return data_mod.StreamSplit(split.ids[:n])
    if isinstance(split, data_mod.SequenceSplit):
        return data_mod.SequenceSplit(split.ids[:n], split.lengths[:n])
    return data_mod.GlimpseSplit(split.glimpses[:n], split.labels[:n])


class TaskData:
    """The batches of a prepared task for one config: training epochs and evaluation passes."""

    def __init__(self, prepared, config: TrainConfig):
        if prepared.kind not in FIGURES:
            raise ValueError(
                f"unknown data kind {prepared.kind!r}; expected one of {tuple(FIGURES)}"
            )
        self.kind = prepared.kind
        self.config = config
        self.train = _limit(prepared.splits["train"], config.max_train_items)
        self.eval = {
            s: _limit(prepared.splits[s], config.max_eval_items) for s in ("valid", "test")
        }

    def n_train_batches(self) -> int:
        c = self.config
        if self.kind == "stream":
            return len(data_mod.lm_batches(self.train.ids, c.batch_size, c.seq_len))
        return data_mod.num_batches(len(self.train), c.batch_size)

    def train_batches(self, epoch: int, start: int):
        """Epoch `epoch`'s batches from batch `start` on: a pure function of (seed, epoch)."""
        c = self.config
        if self.kind == "stream":  # contiguous rows, read left to right: never shuffled
            return data_mod.lm_batches(self.train.ids, c.batch_size, c.seq_len, start=start)
        kw = dict(shuffle=True, seed=c.seed, epoch=epoch, start=start)
        if self.kind == "sequences":
            return data_mod.sequence_batches(self.train.ids, self.train.lengths, c.batch_size, **kw)
        return data_mod.glimpse_batches(self.train.glimpses, self.train.labels, c.batch_size, **kw)

    def eval_batches(self, split: str):
        """Every item of `split` once, in order (streams: every character but the first)."""
        s, c = self.eval[split], self.config
        if self.kind == "stream":
            return data_mod.lm_eval_batches(s.ids, c.batch_size, c.seq_len)
        if self.kind == "sequences":
            return data_mod.sequence_batches(s.ids, s.lengths, c.batch_size)
        return data_mod.glimpse_batches(s.glimpses, s.labels, c.batch_size)


def batch_size_of(batch) -> int:
    return batch.y.shape[-1]


def _targets(batch) -> int:
    """How many targets a whole (unsharded) batch has: what its mean loss divides by."""
    return int(batch.mask.sum()) if isinstance(batch, data_mod.LMBatch) else len(batch.y)


def batch_loss(model, batch, rows: slice, state, device: torch.device, autocast):
    """Summed NLL (nats), correct predictions (glimpses) and the new state of this rank's rows.

    `state` is the recurrent state to start from (None: zeros); the returned state is still
    attached to the graph.
    """
    if isinstance(batch, data_mod.GlimpseBatch):
        x = torch.from_numpy(np.ascontiguousarray(batch.x[:, rows])).to(device)  # (20, b, 49)
        y = torch.from_numpy(np.ascontiguousarray(batch.y[rows])).to(device)  # (b,)
        with autocast():
            logits, _ = model(x)  # (20, b, 10)
        last = logits[-1].float()  # (b, 10): the prediction is the last glimpse's output
        nll = F.cross_entropy(last, y, reduction="sum")
        return nll, (last.argmax(-1) == y).sum(), None
    x = torch.from_numpy(np.ascontiguousarray(batch.x[:, rows])).to(device)  # (S, b)
    y = np.where(batch.mask[:, rows], batch.y[:, rows], IGNORE)  # (S, b), padding ignored
    y = torch.from_numpy(y).to(device)
    with autocast():
        logits, state = model(x, state)  # (S, b, V)
    nll = F.cross_entropy(
        logits.float().flatten(0, 1), y.flatten(), reduction="sum", ignore_index=IGNORE
    )
    return nll, None, state


def detach_state(state):
    """Truncated BPTT: keep the state's values, cut the graph behind them (as pytorch/examples'
    repackage_hidden), so the next batch backpropagates only through itself."""
    if state is None:
        return None
    return tuple(tuple(t.detach() for t in layer) for layer in state)


# -------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
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


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def hardware(device: torch.device, world: int = 1) -> dict[str, Any]:
    """What the run trains on, for metrics.jsonl, checkpoints and the exports made from them."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
    return {"device": str(device), "name": name, "processes": world, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a run, with where it stood: `step` (optimizer steps done) and
    `saved_step`, the step last.pt holds (None when this process has not written or read one).
    A KeyboardInterrupt still, so whoever catches that catches this."""

    def __init__(self, step: int, saved_step: int | None):
        super().__init__(f"interrupted at step {step}")
        self.step, self.saved_step = step, saved_step


# ----------------------------------------------------------------------------- metrics file
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
        blob = "".join(kept).encode()
        atomic_write_bytes(self.path, lambda f: f.write(blob))
        self.lines = keep

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.lines += 1


# ----------------------------------------------------------------------------------- trainer
class Trainer:
    """One training run in `run_dir`. `run()` trains (fresh or resumed) and returns a summary."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | os.PathLike,
        prepared=None,
        *,
        dist_info: Dist | None = None,
        progress: bool | None = None,
        log: Callable[[str], None] | None = None,
        on_step: Callable[[int], None] | None = None,
    ):
        self.config = c = config
        self.dist = dist_info or Dist()
        self.run_dir = Path(run_dir)
        self.device = resolve_device(c.device, self.dist.local_rank, self.dist.world)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        main = self.dist.main
        self.show_progress = main and (sys.stderr.isatty() if progress is None else progress)
        # tqdm.write prints above a live progress bar instead of through it
        self._log = (log or tqdm.write) if main else (lambda *_: None)
        self.on_step = on_step  # called after every optimizer step (tests use it to "kill" runs)

        if c.batch_size % self.dist.world:
            raise ConfigError(
                f"batch_size {c.batch_size} must be divisible by the number of processes "
                f"({self.dist.world}): each rank trains on an equal block of rows"
            )
        if prepared is None:
            prepared = self._load_data()
        elif prepared.task != c.task:
            raise ConfigError(f"config task {c.task!r} but the data given is {prepared.task!r}")
        self.prepared = prepared
        self.data = TaskData(prepared, c)
        self.kind = self.data.kind
        self.n_batches = self.data.n_train_batches()
        if self.n_batches < 1:
            raise ValueError(f"the {c.task} training split is empty: nothing to train on")
        self.model_config = model_config_for(
            c, prepared.vocab_size, prepared.num_classes, self.kind
        )
        self.tokenizer = (
            Path(prepared.tokenizer_path).read_bytes() if prepared.tokenizer_path else None
        )

        seed_everything(c.seed)  # the same initial weights on every rank
        self.model = build_model(self.model_config).to(self.device)
        if c.cuda_graphs:  # the NLSTM's fused sequence as CUDA graphs (training.nlstm_graphs)
            if not hasattr(self.model.core, "cuda_graphs"):
                raise ConfigError(
                    f"cuda_graphs applies to the nlstm core only, not {self.model_config.core!r}"
                )
            self.model.core.cuda_graphs = True
            if self.device.type != "cuda":
                self._log(f"cuda_graphs: ignored on {self.device.type} (CUDA graphs need CUDA)")
        self.train_model = self.model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        o = c.optimizer
        params = self.model.parameters()
        if o.name == "adam":
            self.optimizer = torch.optim.Adam(params, lr=o.lr, eps=o.eps)
        else:
            self.optimizer = torch.optim.RMSprop(params, lr=o.lr, alpha=o.alpha, eps=o.eps)

        # Where training stands; all of it goes into last.pt.
        self.step = 0
        self.epoch = 0  # epochs completed
        self.batch = 0  # next batch of the current epoch
        self.state = None  # carried recurrent state of this rank's rows (streams)
        # Training sums since the last evaluation: summed NLL, targets, correct predictions.
        self.running = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.train_seconds = 0.0  # training time since the last evaluation
        self.elapsed = 0.0  # training + evaluation time of the whole run
        self.last_eval_step = -1
        self.best: dict[str, dict[str, Any]] = {}
        self.last_record: dict[str, Any] = {}
        self.saved_step: int | None = None  # the step last.pt holds, once written or restored
        self.metrics = MetricsFile(self.run_dir / METRICS)

    # ------------------------------------------------------------------------------- setup
    def _load_data(self):
        c = self.config
        kw = dict(data_dir=c.data_dir or None, cache_dir=c.cache_dir or None)
        if self.dist.world > 1:  # rank 0 prepares the cache; the others then only read it
            if self.dist.main:
                prepared = data_mod.load(c.task, **kw)
            dist.barrier()
            if not self.dist.main:
                prepared = data_mod.load(c.task, **kw)
            return prepared
        return data_mod.load(c.task, **kw)

    def _init_from(self, path: str) -> None:
        """Load the weights of checkpoint `path` into the fresh model (a warm start: every rank
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
            self.model.load_state_dict(ckpt.model)
        self._log(f"initialised from the weights of {path} (its step {ckpt.step})")

    def _autocast(self):
        return torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16
        )

    def _existing(self) -> list[str]:
        return existing_run_files(self.run_dir)

    def close(self) -> None:
        """Release the DistributedDataParallel wrapper, which holds the process group: call it
        before `destroy_process_group`, so that gloo's threads stop while Python is alive and not
        when a garbage cycle is collected at interpreter exit (that aborts the process)."""
        self.train_model = self.model
        gc.collect()

    # --------------------------------------------------------------------------------- run
    def run(self, resume: bool = False) -> dict[str, Any]:
        last = self.run_dir / LAST
        existing = self._existing()
        if self.dist.world > 1:
            dist.barrier()  # every rank has looked before rank 0 writes anything
        if existing and not resume:  # what this rank saw before the barrier
            refuse_existing_run(self.run_dir, existing)
        if self.dist.main:
            self._remove_stale_temporaries()
        if resume and LAST in existing:
            self._restore(load_checkpoint(last, map_location="cpu"))
        else:
            if resume:
                self._log(f"no {last} yet: starting the run from the beginning")
            if self.config.init_from:  # a resumed run has its weights from last.pt instead
                self._init_from(self.config.init_from)
            if self.dist.main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.metrics.reset(0)
                self.metrics.append(self._run_record())
        return self._loop()

    def _remove_stale_temporaries(self) -> None:
        """Delete what a SIGKILL mid-write left of the run folder's atomic writes (checkpoints,
        metrics.jsonl): nothing else writes them now, so no such file is a live write's."""
        for path in remove_stale_temporaries(self.run_dir, (LAST, BEST, METRICS)):
            self._log(f"removed {path.name}: the temporary file of a write killed before it ended")

    def _run_record(self) -> dict[str, Any]:
        return {
            "type": "run",
            "task": self.config.task,
            "seed": self.config.seed,
            "config": self.config.to_dict(),
            "model_config": self.model_config.to_dict(),
            "params": count_parameters(self.model),
            "train_batches_per_epoch": self.n_batches,
            "device": str(self.device),
            "world_size": self.dist.world,
            "versions": versions(),
            "hardware": hardware(self.device, self.dist.world),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _loop(self) -> dict[str, Any]:
        c = self.config
        if c.max_steps and self.step >= c.max_steps:
            self._log(f"step {self.step} already reaches max_steps={c.max_steps}: nothing to do")
            return self._summary("max_steps")
        if self.epoch >= c.epochs:
            self._log(f"all {c.epochs} epochs are done: nothing to do")
            return self._summary("done")
        stopped = "done"
        while self.epoch < c.epochs:
            if self.batch == 0:
                self.state = None  # a new pass reads every row from its start: zero state
            set_epoch = getattr(self.model, "set_epoch", None)
            if set_epoch is not None:  # per-epoch schedules inside a model (HM-LSTM's slope)
                set_epoch(self.epoch)
            bar = tqdm(
                total=self.n_batches,
                initial=self.batch,
                desc=f"epoch {self.epoch + 1}/{c.epochs}",
                unit="batch",
                disable=not self.show_progress,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
            )
            try:
                for batch in self.data.train_batches(self.epoch, self.batch):
                    t = time.perf_counter()
                    stepped = self._train_step(batch)
                    self.batch += 1
                    bar.update(1)
                    end_of_epoch = self.batch == self.n_batches
                    if end_of_epoch:
                        self.epoch, self.batch, self.state = self.epoch + 1, 0, None
                    dt = time.perf_counter() - t
                    self.train_seconds += dt
                    self.elapsed += dt
                    if self.show_progress and (self.batch % 10 == 0 or end_of_epoch):
                        self._progress(bar)
                    stop = bool(c.max_steps) and self.step >= c.max_steps
                    if stepped and self.on_step is not None:
                        self.on_step(self.step)
                    due_eval = end_of_epoch or stop or (
                        stepped and c.eval_every and self.step % c.eval_every == 0
                    )
                    due_ckpt = (
                        stepped and c.checkpoint_every and self.step % c.checkpoint_every == 0
                    )
                    if due_eval:
                        self._evaluate()
                    if due_eval or due_ckpt:
                        self._save_last()
                    if stop:
                        stopped = "max_steps"
                        break
            finally:
                bar.close()
            if stopped == "max_steps":
                break
        return self._summary(stopped)

    def _progress(self, bar) -> None:
        """Loss and throughput since the last evaluation on the bar (tqdm adds the ETA)."""
        nll, count, correct = self.running.tolist()
        loss = figures(self.kind, nll, count, correct).get(PRIMARY[self.kind])
        rate = count * self.dist.world / max(self.train_seconds, 1e-9)
        unit = "chars/s" if self.kind != "glimpses" else "images/s"
        bar.set_postfix(
            {PRIMARY[self.kind]: "-" if loss is None else f"{loss:.3f}", unit: f"{rate:,.0f}"},
            refresh=False,
        )

    def _summary(self, stopped: str) -> dict[str, Any]:
        return {
            "stopped": stopped,
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "best": self.best,
            "last": self.last_record,
            "run_dir": str(self.run_dir),
        }

    # ------------------------------------------------------------------------------ a step
    def learning_rate(self) -> float:
        """The learning rate of the next update. The linear schedule runs from optimizer.lr to
        optimizer.lr_final over epochs x batches per epoch; a function of the step alone, so a
        resumed run follows it exactly."""
        o = self.config.optimizer
        if o.schedule == "constant":
            return o.lr
        total = max(1, self.config.epochs * self.n_batches - 1)
        frac = min(self.step, total) / total
        return o.lr + (o.lr_final - o.lr) * frac

    def _train_step(self, batch) -> bool:
        """One optimizer step on this rank's rows of `batch`. False when skipped: a last batch
        with fewer items than processes (poems, mnist under DDP) is skipped on every rank."""
        n = batch_size_of(batch)
        if n < self.dist.world:
            return False
        self.model.train()
        rows = self.dist.rows(n)
        total = _targets(batch)  # the global batch's targets: the mean's denominator
        start = self.state if (self.config.carry_state and self.kind == "stream") else None
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        nll, correct, state = batch_loss(
            self.train_model, batch, rows, start, self.device, self._autocast
        )
        # DDP averages gradients over ranks: scale so the average is d(global mean loss).
        (nll * (self.dist.world / total)).backward()
        if self.config.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip)
        self.optimizer.step()
        self.step += 1
        carry = self.kind == "stream" and self.config.carry_state
        self.state = detach_state(state) if carry else None
        local_targets = (
            int(batch.mask[:, rows].sum()) if isinstance(batch, data_mod.LMBatch)
            else rows.stop - rows.start
        )
        self.running += torch.stack([
            nll.detach().double(),
            torch.tensor(float(local_targets), dtype=torch.float64, device=self.device),
            (correct.double() if correct is not None
             else torch.zeros((), dtype=torch.float64, device=self.device)),
        ])
        return True

    # -------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate_split(self, split: str) -> dict[str, float]:
        """The figures of `split` (valid or test): every item once, the state carried across
        the batches of a stream."""
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        state = None
        for batch in self.data.eval_batches(split):
            rows = self.dist.rows(batch_size_of(batch))
            if rows.stop == rows.start:
                continue
            nll, correct, state = batch_loss(
                self.model, batch, rows, state, self.device, self._autocast
            )
            if self.kind != "stream":
                state = None  # poems and images are independent: each starts from zeros
            targets = (
                int(batch.mask[:, rows].sum()) if isinstance(batch, data_mod.LMBatch)
                else rows.stop - rows.start
            )
            sums += torch.stack([
                nll.double(),
                torch.tensor(float(targets), dtype=torch.float64, device=self.device),
                correct.double() if correct is not None else sums.new_zeros(()),
            ])
        if self.dist.world > 1:
            dist.all_reduce(sums)
        return figures(self.kind, *sums.tolist())

    def _evaluate(self) -> None:
        t = time.perf_counter()
        running = self.running.clone()
        if self.dist.world > 1:
            dist.all_reduce(running)
        train = figures(self.kind, *running.tolist())
        valid = self.evaluate_split("valid")
        test = self.evaluate_split("test")
        frac = self.epoch + self.batch / self.n_batches
        rec: dict[str, Any] = {
            "type": "eval",
            "epoch": self.epoch if self.batch == 0 else round(frac, 4),
            "step": self.step,
            "lr": self.optimizer.param_groups[0]["lr"],  # of the last update
        }
        rec.update({f"train_{k}": v for k, v in train.items()})
        rec.update({f"valid_{k}": v for k, v in valid.items()})
        rec.update({f"test_{k}": v for k, v in test.items()})
        improved = False
        for k in FIGURES[self.kind]:
            if k not in valid:
                continue
            old = self.best.get(k)
            better = old is None or (
                valid[k] > old["valid"] if k in HIGHER_IS_BETTER else valid[k] < old["valid"]
            )
            if better:
                self.best[k] = {"valid": valid[k], "test": test.get(k), "epoch": rec["epoch"],
                                "step": self.step}
                improved |= k == PRIMARY[self.kind]
            rec[f"best_valid_{k}"] = self.best[k]["valid"]
            rec[f"best_test_{k}"] = self.best[k]["test"]
        primary = self.best.get(PRIMARY[self.kind], {})
        rec["best_epoch"], rec["best_step"] = primary.get("epoch"), primary.get("step")
        rec["train_items_per_s"] = (
            running[1].item() / self.train_seconds if self.train_seconds > 0 else None
        )
        self.elapsed += time.perf_counter() - t
        rec["elapsed_s"] = round(self.elapsed, 3)
        self.running.zero_()
        self.train_seconds = 0.0
        self.last_eval_step = self.step
        self.last_record = rec
        if self.dist.main:
            self.metrics.append(rec)
        self._log(self._eval_line(rec))
        if improved:
            self._save(self.run_dir / BEST, with_optimizer=False)

    def _eval_line(self, rec: dict) -> str:
        parts = [f"epoch {rec['epoch']} step {rec['step']}:"]
        for k, v in rec.items():
            if k.startswith(("train_", "valid_", "test_")) and not k.endswith("_per_s"):
                parts.append(f"{k} {v:.4f}")
        k = PRIMARY[self.kind]
        if f"best_valid_{k}" in rec:
            parts.append(f"(best valid_{k} {rec[f'best_valid_{k}']:.4f}, "
                         f"its test_{k} {rec[f'best_test_{k}']:.4f})")
        return " ".join(parts)

    # ------------------------------------------------------------------------- checkpoints
    def _gathered_state(self):
        """The carried state of all ranks' rows as one global (B, H) state (or None)."""
        if self.state is None:
            return None
        if self.dist.world == 1:
            return [[t.detach().cpu() for t in layer] for layer in self.state]
        out = []
        for layer in self.state:
            full = []
            for t in layer:
                parts = [torch.empty_like(t) for _ in range(self.dist.world)]
                dist.all_gather(parts, t.contiguous())
                full.append(torch.cat(parts).cpu())
            out.append(full)
        return out

    def _save_last(self) -> None:
        self._save(self.run_dir / LAST, with_optimizer=True)
        self.saved_step = self.step

    def _save(self, path: Path, with_optimizer: bool) -> None:
        # Collectives first, on every rank; then rank 0 writes.
        state = self._gathered_state()
        running = self.running.clone()
        if self.dist.world > 1:
            dist.all_reduce(running)  # saved as rank 0's sums; other ranks resume from zero
        if not self.dist.main:
            return
        trainer_state = {
            "version": TRAINER_STATE_VERSION,
            "position": {"epoch": self.epoch, "batch": self.batch},
            "carry": state,
            "running": running.cpu(),
            "train_seconds": self.train_seconds,
            "elapsed": self.elapsed,
            "last_eval_step": self.last_eval_step,
            "best": self.best,
            "last_record": self.last_record,
            "metrics_lines": self.metrics.lines,
            "world_size": self.dist.world,
        }
        metrics = {**self.last_record}
        save_checkpoint(
            Checkpoint(
                task=self.config.task,
                model_config=self.model_config,
                model=self.model.state_dict(),
                tokenizer=self.tokenizer,
                train_config=self.config.to_dict(),
                step=self.step,
                epoch=self.epoch,
                metrics=_jsonable(metrics),
                optimizer=_to_cpu(self.optimizer.state_dict()) if with_optimizer else None,
                rng=rng_state(),
                extra={"trainer": trainer_state, "hardware": hardware(self.device, self.dist.world)},
            ),
            path,
        )

    def _restore(self, ckpt: Checkpoint) -> None:
        path = self.run_dir / LAST
        ts = ckpt.extra.get("trainer")
        if not isinstance(ts, dict) or ts.get("version") != TRAINER_STATE_VERSION:
            raise CheckpointError(
                f"{path} holds no training position (not written by `nlstm train`, or by another "
                "version of it): it can be exported but not resumed"
            )
        if ckpt.optimizer is None:
            raise CheckpointError(f"{path} has no optimizer state and cannot be resumed")
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
                f"cannot resume {self.run_dir}: the config differs from the checkpoint's in "
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
        with torch.no_grad():
            self.model.load_state_dict(ckpt.model)
        self.optimizer.load_state_dict(ckpt.optimizer)
        set_rng_state(ckpt.rng)
        self.step = int(ckpt.step)
        self.epoch = int(ts["position"]["epoch"])
        self.batch = int(ts["position"]["batch"])
        if ts["carry"] is not None:
            rows = self.dist.rows(self.config.batch_size)
            self.state = tuple(
                tuple(t[rows].to(self.device) for t in layer) for layer in ts["carry"]
            )
        self.running = ts["running"].to(self.device, torch.float64)
        if not self.dist.main:
            self.running.zero_()
        self.train_seconds = float(ts["train_seconds"])
        self.elapsed = float(ts["elapsed"])
        self.last_eval_step = int(ts["last_eval_step"])
        self.best = ts["best"]
        self.last_record = ts["last_record"]
        self.saved_step = self.step
        c = self.config
        finished = self.epoch >= c.epochs or bool(c.max_steps and self.step >= c.max_steps)
        if self.dist.main:
            self.metrics.reset(int(ts["metrics_lines"]))
        if self.dist.main and not finished:  # resuming a finished run records nothing
            self.metrics.append({
                "type": "resume",
                "step": self.step,
                "epoch": self.epoch,
                "batch": self.batch,
                "world_size": self.dist.world,
                "versions": versions(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
        self._log(
            f"resumed {self.run_dir} at step {self.step} (epoch {self.epoch}, batch {self.batch})"
        )


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))


# ------------------------------------------------------------------------------ entry point
def train(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    prepared=None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train `config` in `run_dir` (resuming from its last.pt when `resume`); returns a summary
    with the best figures.

    `prepared` replaces `training.data.load(config.task)` (tests pass small synthetic data);
    `progress` forces the progress bar on or off (default: on when stderr is a terminal);
    `on_step(step)` runs after every optimizer step. Under torchrun (WORLD_SIZE > 1) this joins
    the process group, nccl on CUDA and gloo on the CPU.
    """
    info = dist_from_env()
    own_group = False
    if info.world > 1 and not dist.is_initialized():
        device = resolve_device(config.device, info.local_rank, info.world)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        own_group = True
    trainer = None
    try:
        trainer = Trainer(
            config, run_dir, prepared, dist_info=info, progress=progress, log=log, on_step=on_step
        )
        try:
            summary = trainer.run(resume=resume)
        except KeyboardInterrupt:
            raise Interrupted(trainer.step, trainer.saved_step) from None
        if own_group:
            dist.barrier()  # leave together: no rank tears down while a peer still writes
        return summary
    finally:
        if trainer is not None:
            trainer.close()
        if own_group:
            dist.destroy_process_group()


__all__ = [
    "BEST",
    "LAST",
    "METRICS",
    "Dist",
    "Interrupted",
    "MetricsFile",
    "TaskData",
    "Trainer",
    "batch_loss",
    "detach_state",
    "dist_from_env",
    "figures",
    "read_metrics",
    "resolve_device",
    "train",
]
