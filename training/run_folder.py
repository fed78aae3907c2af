"""A run folder's files by name, and the check that a new run does not overwrite an old one.

Kept apart from the trainer (which imports torch) so that `nlstm train` can refuse a folder
that already holds a run, or say what an interrupted run saved, at once: before torch, the
data and the model are loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

METRICS = "metrics.jsonl"  # a "run" line, then one line per evaluation (and per resume)
LAST = "last.pt"  # what --resume continues from: weights, optimizer, RNGs, data position
BEST = "best.pt"  # the weights of the best validation figure so far


def existing_run_files(run_dir: str | os.PathLike) -> list[str]:
    """The names of a run's files already in run_dir (empty: no run there)."""
    return [n for n in (METRICS, LAST, BEST) if (Path(run_dir) / n).exists()]


def refuse_existing_run(run_dir: str | os.PathLike, existing: list[str] | None = None) -> None:
    """ValueError when run_dir already holds a run that a fresh start would overwrite
    (`existing`: the files found by an earlier look, default: look now)."""
    existing = existing_run_files(run_dir) if existing is None else existing
    if existing:
        raise ValueError(
            f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume "
            "to continue it, or choose another --run-dir"
        )
