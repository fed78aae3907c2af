"""Results tables from run folders: each run's figures at its best validation, and the mean and
spread over seeds of the same row.

A run folder holds `metrics.jsonl` (training/trainer.py writes it): one `run` line per start
and one `eval` line per evaluation, each eval line carrying `best_valid_K` / `best_test_K` for
every figure K of its task (the test figure at the evaluation of best validation for that
figure, as the paper reports). This module reads those lines only; it imports no torch, so it
runs wherever the runs were copied.

Runs of one row differ only by seed; their folders are grouped by the name with a trailing
`-sN` (or `-seedN`) removed, so `mnist-nlstm-2x75-s1`, `-s2`, `-s3` make one row.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

# Which figures a table shows per task, in order, and how each is printed.
FIGURES = {
    "ptb": ("bpc",),
    "text8": ("bpc",),
    "poems": ("ppl",),
    "mnist": ("nll", "acc"),
}
_SEED_SUFFIX = re.compile(r"-(?:s|seed)(\d+)$")


class SummaryError(ValueError):
    """A folder that is not a run (no metrics.jsonl) or a run with no evaluation yet."""


class NoEvaluationYet(SummaryError):
    """A run that has started but not evaluated yet (`nlstm summary` leaves it out, says so)."""


@dataclass
class RunFigures:
    """One run's figures at its last evaluation."""

    name: str
    task: str
    seed: int | None
    params: int | None
    epoch: float
    step: int
    valid: dict[str, float] = field(default_factory=dict)  # figure -> best valid
    test: dict[str, float] = field(default_factory=dict)  # figure -> test at that evaluation
    finished: bool = False  # reached its configured number of epochs
    seconds: float = 0.0  # training and evaluation time (elapsed_s of the last eval)


def read_run(run_dir: str | Path) -> RunFigures:
    """The figures of the run in `run_dir` at its last evaluation."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SummaryError(f"{run_dir} is not a run folder: it has no metrics.jsonl")
    header: dict | None = None
    last: dict | None = None
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write: the lines before it still count
            if rec.get("type") == "run" and header is None:
                header = rec
            elif rec.get("type") == "eval":
                last = rec
    if header is None or last is None:
        raise NoEvaluationYet(f"{path} has no evaluation yet")
    task = header.get("task", "")
    figs = FIGURES.get(task)
    if figs is None:
        raise SummaryError(f"{path}: unknown task {task!r}; known: {', '.join(FIGURES)}")
    valid = {k: last[f"best_valid_{k}"] for k in figs if f"best_valid_{k}" in last}
    test = {k: last[f"best_test_{k}"] for k in figs if f"best_test_{k}" in last}
    epochs = (header.get("config") or {}).get("epochs")
    epoch = float(last.get("epoch", 0))
    return RunFigures(
        name=run_dir.name,
        task=task,
        seed=header.get("seed"),
        params=header.get("params"),
        epoch=epoch,
        step=int(last.get("step", 0)),
        valid=valid,
        test=test,
        finished=epochs is not None and epoch >= epochs,
        seconds=float(last.get("elapsed_s", 0)),
    )


def row_name(run_name: str) -> str:
    """The row a run belongs to: its folder name without a trailing seed suffix."""
    return _SEED_SUFFIX.sub("", run_name)


@dataclass
class Row:
    """The runs of one table row (one per seed) and their mean and standard deviation."""

    name: str
    runs: list[RunFigures]

    def mean_std(self, split: str, k: str) -> tuple[float, float]:
        """Mean and sample standard deviation (0 for one run) of a figure over the row's runs."""
        vals = [getattr(r, split)[k] for r in self.runs if k in getattr(r, split)]
        if not vals:
            return math.nan, math.nan
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def group(runs: list[RunFigures]) -> list[Row]:
    """Runs grouped into rows by `row_name`, in the order each row first appears."""
    rows: dict[str, Row] = {}
    for r in runs:
        rows.setdefault(row_name(r.name), Row(row_name(r.name), [])).runs.append(r)
    return list(rows.values())


def _fmt(k: str, mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "-"
    if k == "acc":
        text = f"{100 * mean:.2f}%"
        return text + (f" ± {100 * std:.2f}" if n > 1 else "")
    digits = 2 if k == "ppl" else 4 if k == "nll" else 3
    text = f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if n > 1 else "")


def markdown(rows: list[Row]) -> str:
    """A markdown table: one line per row, valid and test for each figure of its task (mean ±
    sample standard deviation over seeds where there are several)."""
    if not rows:
        raise SummaryError("no runs to summarise")
    tasks = {r.runs[0].task for r in rows}
    if len(tasks) > 1:
        raise SummaryError(f"runs of several tasks ({', '.join(sorted(tasks))}): one table each")
    figs = FIGURES[tasks.pop()]
    head = ["row", "seeds", "params", "epochs"]
    for k in figs:
        head += [f"valid {k}", f"test {k}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        n = len(row.runs)
        epochs = sorted({r.epoch for r in row.runs})
        ep = "/".join(f"{e:g}" for e in epochs) + (
            "" if all(r.finished for r in row.runs) else " (running)"
        )
        seeds = ",".join(str(r.seed) for r in row.runs)
        params = row.runs[0].params
        cells = [row.name, seeds, f"{params:,}" if params else "-", ep]
        for k in figs:
            for split in ("valid", "test"):
                cells.append(_fmt(k, *row.mean_std(split, k), n))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
