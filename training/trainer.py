"""The training loop: batches, truncated BPTT, evaluation and DDP, for any task and any model.

The trainer knows neither the model it trains (the config's [model] section picks it through
`build_model`) nor the task: the prepared data's kind names a `training.tasks.TaskKind`, which
owns the batches, the loss and its target count, whether the recurrent state carries across
batches, and the figures (stream: bpc; sequences: ppl; glimpses: nll and acc). The run's
bookkeeping (metrics.jsonl, last.pt and best.pt, exact resume, RNG states) is
training.run_state's; docs/training.md describes the run folder.

Several processes (`torchrun --nproc_per_node=N -m training.cli train ...`) train with
DistributedDataParallel (training.distributed): every rank builds the same global batch and
takes a disjoint, contiguous block of its rows; the loss is scaled so that DDP's gradient
average equals the gradient of the global batch's mean loss. Evaluation is sharded the same way
and its sums are all-reduced.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from training import data as data_mod
from training import nlstm_native
from training.config import ConfigError, TrainConfig, model_config_for
from training.distributed import Dist, dist_from_env, process_group, resolve_device
from training.models import build_model
from training.run_folder import BEST, LAST, METRICS, refuse_existing_run
from training.run_state import RunFiles, RunState, read_metrics, seed_everything
from training.tasks import TaskData, task_kind


def figures(kind: str, nll: float, count: float, correct: float) -> dict[str, float]:
    """The figures of data kind `kind` from summed NLL (nats), targets and correct predictions."""
    return task_kind(kind).figures_of(nll, count, correct)


def detach_state(state):
    """Truncated BPTT: keep the state's values, cut the graph behind them (as pytorch/examples'
    repackage_hidden), so the next batch backpropagates only through itself."""
    if state is None:
        return None
    return tuple(tuple(t.detach() for t in layer) for layer in state)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a run, with where it stood: `step` (optimizer steps done) and
    `saved_step`, the step last.pt holds (None when this process has not written or read one).
    A KeyboardInterrupt still, so whoever catches that catches this."""

    def __init__(self, step: int, saved_step: int | None):
        super().__init__(f"interrupted at step {step}")
        self.step, self.saved_step = step, saved_step


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
        tokenizer = Path(prepared.tokenizer_path).read_bytes() if prepared.tokenizer_path else None
        self.tokenizer = tokenizer

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
        if self.model_config.core == "nlstm" and self.device.type == "cpu":
            # builds (once, into a cache folder) or loads the fused path's C++ step kernels
            # and says which; without them it runs its pure-PyTorch loops (training.nlstm_native)
            self._log(nlstm_native.status())
        self.train_model: torch.nn.Module = self.model  # the model, or its DDP wrapper
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        o = c.optimizer
        params = self.model.parameters()
        self.optimizer: torch.optim.Optimizer
        if o.name == "adam":
            self.optimizer = torch.optim.Adam(params, lr=o.lr, eps=o.eps)
        else:
            self.optimizer = torch.optim.RMSprop(params, lr=o.lr, alpha=o.alpha, eps=o.eps)

        self.files = RunFiles(self.run_dir, c, self.model_config, tokenizer, self.dist, self._log)
        self.at = RunState.fresh(self.device)  # where training stands; all of it goes into last.pt

    @property
    def step(self) -> int:
        """Optimizer steps taken."""
        return self.at.step

    @property
    def saved_step(self) -> int | None:
        """The step last.pt holds, once this process has written or restored it."""
        return self.at.saved_step

    # ------------------------------------------------------------------------------- setup
    def _load_data(self):
        c = self.config
        kw = dict(
            data_dir=Path(c.data_dir) if c.data_dir else None,
            cache_dir=Path(c.cache_dir) if c.cache_dir else None,
        )
        if self.dist.world > 1:  # rank 0 prepares the cache; the others then only read it
            if self.dist.main:
                prepared = data_mod.load(c.task, **kw)
            self.dist.barrier()
            if not self.dist.main:
                prepared = data_mod.load(c.task, **kw)
            return prepared
        return data_mod.load(c.task, **kw)

    def _autocast(self):
        return torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16
        )

    def close(self) -> None:
        """Release the DistributedDataParallel wrapper, which holds the process group: call it
        before `destroy_process_group`, so that gloo's threads stop while Python is alive and not
        when a garbage cycle is collected at interpreter exit (that aborts the process)."""
        self.train_model = self.model
        gc.collect()

    # --------------------------------------------------------------------------------- run
    def run(self, resume: bool = False) -> dict[str, Any]:
        existing = self.files.existing()
        self.dist.barrier()  # every rank has looked before rank 0 writes anything
        if existing and not resume:  # what this rank saw before the barrier
            refuse_existing_run(self.run_dir, existing)
        if self.dist.main:
            self.files.remove_stale_temporaries()
        if resume and LAST in existing:
            self.at = self.files.resume(self.model, self.optimizer, self.device)
        else:
            if resume:
                self._log(f"no {self.run_dir / LAST} yet: starting the run from the beginning")
            if self.config.init_from:  # a resumed run has its weights from last.pt instead
                self.files.warm_start(self.config.init_from, self.model)
            self.files.start(self.model, self.n_batches, self.device)
        return self._loop()

    def _loop(self) -> dict[str, Any]:
        c, at = self.config, self.at
        if c.max_steps and at.step >= c.max_steps:
            self._log(f"step {at.step} already reaches max_steps={c.max_steps}: nothing to do")
            return self._summary("max_steps")
        if at.epoch >= c.epochs:
            self._log(f"all {c.epochs} epochs are done: nothing to do")
            return self._summary("done")
        stopped = "done"
        while at.epoch < c.epochs:
            if at.batch == 0:
                at.carry = None  # a new pass reads every row from its start: zero state
            set_epoch = getattr(self.model, "set_epoch", None)
            if set_epoch is not None:  # per-epoch schedules inside a model (HM-LSTM's slope)
                set_epoch(at.epoch)
            bar = tqdm(
                total=self.n_batches,
                initial=at.batch,
                desc=f"epoch {at.epoch + 1}/{c.epochs}",
                unit="batch",
                disable=not self.show_progress,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
            )
            try:
                for batch in self.data.train_batches(at.epoch, at.batch):
                    t = time.perf_counter()
                    stepped = self._train_step(batch)
                    at.batch += 1
                    bar.update(1)
                    end_of_epoch = at.batch == self.n_batches
                    if end_of_epoch:
                        at.epoch, at.batch, at.carry = at.epoch + 1, 0, None
                    dt = time.perf_counter() - t
                    at.train_seconds += dt
                    at.elapsed += dt
                    if self.show_progress and (at.batch % 10 == 0 or end_of_epoch):
                        self._progress(bar)
                    stop = bool(c.max_steps) and at.step >= c.max_steps
                    if stepped and self.on_step is not None:
                        self.on_step(at.step)
                    due_eval = (
                        end_of_epoch
                        or stop
                        or (stepped and c.eval_every and at.step % c.eval_every == 0)
                    )
                    due_ckpt = stepped and c.checkpoint_every and at.step % c.checkpoint_every == 0
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
        nll, count, correct = self.at.running.tolist()
        primary = self.kind.primary
        loss = self.kind.figures_of(nll, count, correct).get(primary)
        rate = count * self.dist.world / max(self.at.train_seconds, 1e-9)
        bar.set_postfix(
            {
                primary: "-" if loss is None else f"{loss:.3f}",
                f"{self.kind.unit}/s": f"{rate:,.0f}",
            },
            refresh=False,
        )

    def _summary(self, stopped: str) -> dict[str, Any]:
        at = self.at
        return {
            "stopped": stopped,
            "step": at.step,
            "epoch": at.epoch,
            "batch": at.batch,
            "best": at.best,
            "last": at.last_record,
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
        frac = min(self.at.step, total) / total
        return o.lr + (o.lr_final - o.lr) * frac

    def _train_step(self, batch) -> bool:
        """One optimizer step on this rank's rows of `batch`. False when skipped: a last batch
        with fewer items than processes (poems, mnist under DDP) is skipped on every rank."""
        at, kind = self.at, self.kind
        n = kind.batch_size(batch)
        if n < self.dist.world:
            return False
        self.model.train()
        rows = self.dist.rows(n)
        total = kind.targets(batch)  # the global batch's targets: the mean's denominator
        carry = kind.carries_state and self.config.carry_state
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        out = kind.loss(
            self.train_model, batch, rows, at.carry if carry else None, self.device, self._autocast
        )
        # DDP averages gradients over ranks: scale so the average is d(global mean loss).
        (out.nll * (self.dist.world / total)).backward()
        if self.config.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip)
        self.optimizer.step()
        at.step += 1
        at.carry = detach_state(out.state) if carry else None
        at.running += self._sums(out)
        return True

    def _sums(self, out) -> torch.Tensor:
        """(3,) float64: a BatchLoss's summed NLL, targets and correct predictions."""
        return torch.stack(
            [
                out.nll.detach().double(),
                torch.tensor(float(out.targets), dtype=torch.float64, device=self.device),
                out.correct.detach().double(),
            ]
        )

    # -------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate_split(self, split: str) -> dict[str, float]:
        """The figures of `split` (valid or test): every item once, the state carried across
        the batches where the kind carries it (streams)."""
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        state = None
        for batch in self.data.eval_batches(split):
            rows = self.dist.rows(self.kind.batch_size(batch))
            if rows.stop == rows.start:
                continue
            out = self.kind.loss(self.model, batch, rows, state, self.device, self._autocast)
            state = out.state if self.kind.carries_state else None  # else each starts from zeros
            sums += self._sums(out)
        return self.kind.figures_of(*self.dist.sum(sums).tolist())

    def _evaluate(self) -> None:
        at, kind = self.at, self.kind
        t = time.perf_counter()
        running = self.dist.sum(at.running.clone())
        train = kind.figures_of(*running.tolist())
        valid = self.evaluate_split("valid")
        test = self.evaluate_split("test")
        frac = at.epoch + at.batch / self.n_batches
        rec: dict[str, Any] = {
            "type": "eval",
            "epoch": at.epoch if at.batch == 0 else round(frac, 4),
            "step": at.step,
            "lr": self.optimizer.param_groups[0]["lr"],  # of the last update
        }
        rec.update({f"train_{k}": v for k, v in train.items()})
        rec.update({f"valid_{k}": v for k, v in valid.items()})
        rec.update({f"test_{k}": v for k, v in test.items()})
        improved = False
        for k in kind.figures:
            if k not in valid:
                continue
            if kind.better(k, valid[k], at.best.get(k, {}).get("valid")):
                at.best[k] = {
                    "valid": valid[k],
                    "test": test.get(k),
                    "epoch": rec["epoch"],
                    "step": at.step,
                }
                improved |= k == kind.primary
            rec[f"best_valid_{k}"] = at.best[k]["valid"]
            rec[f"best_test_{k}"] = at.best[k]["test"]
        primary = at.best.get(kind.primary, {})
        rec["best_epoch"], rec["best_step"] = primary.get("epoch"), primary.get("step")
        rec["train_items_per_s"] = (
            running[1].item() / at.train_seconds if at.train_seconds > 0 else None
        )
        at.elapsed += time.perf_counter() - t
        rec["elapsed_s"] = round(at.elapsed, 3)
        at.running.zero_()
        at.train_seconds = 0.0
        at.last_eval_step = at.step
        at.last_record = rec
        self.files.record(rec)
        self._log(self._eval_line(rec))
        if improved:
            self.files.save(BEST, at, self.model, self.device)

    def _eval_line(self, rec: dict) -> str:
        parts = [f"epoch {rec['epoch']} step {rec['step']}:"]
        for k, v in rec.items():
            if k.startswith(("train_", "valid_", "test_")) and not k.endswith("_per_s"):
                parts.append(f"{k} {v:.4f}")
        k = self.kind.primary
        if f"best_valid_{k}" in rec:
            parts.append(
                f"(best valid_{k} {rec[f'best_valid_{k}']:.4f}, "
                f"its test_{k} {rec[f'best_test_{k}']:.4f})"
            )
        return " ".join(parts)

    def _save_last(self) -> None:
        self.files.save(LAST, self.at, self.model, self.device, self.optimizer)
        self.at.saved_step = self.at.step


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
    with process_group(info, config.device) as own_group:
        trainer = None
        try:
            trainer = Trainer(
                config,
                run_dir,
                prepared,
                dist_info=info,
                progress=progress,
                log=log,
                on_step=on_step,
            )
            try:
                summary = trainer.run(resume=resume)
            except KeyboardInterrupt:
                raise Interrupted(trainer.step, trainer.saved_step) from None
            if own_group:
                info.barrier()  # leave together: no rank tears down while a peer still writes
            return summary
        finally:
            if trainer is not None:
                trainer.close()


__all__ = [
    "BEST",
    "LAST",
    "METRICS",
    "Dist",
    "Interrupted",
    "TaskData",
    "Trainer",
    "detach_state",
    "dist_from_env",
    "figures",
    "read_metrics",
    "resolve_device",
    "train",
]
