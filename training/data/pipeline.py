"""The data entry points: `download`, `prepare` and `load` a task by name.

`prepare` is idempotent: it returns at once when the prepared folder for these raw files and
parameters exists, and otherwise verifies (downloading what is missing) the raw files and builds
the folder. `load` prepares if needed, then opens the folder's arrays memory-mapped, so a
training run never re-tokenizes and does not need the raw files once the cache exists.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from serving.formats import Tokenizer
from training.data import cache, mnist, poems, ptb, text8
from training.data.fetch import default_data_dir, ensure_raw_files, sha256_file, show_progress
from training.data.task import SPLITS, Split, Task

TASKS: dict[str, Task] = {t.name: t for t in (ptb.TASK, text8.TASK, poems.TASK, mnist.TASK)}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


@dataclass(frozen=True)
class Summary:
    """What `prepare` did; str() is the short human summary the CLI prints."""

    task: str
    path: Path  # the prepared folder
    meta: dict
    cached: bool  # True when the folder already existed
    seconds: float

    def __str__(self) -> str:
        m = self.meta
        parts = []
        for split in SPLITS:
            s = m["splits"][split]
            if "poems" in s:
                text = f"{split} {s['poems']:,} poems ({s['chars']:,} chars)"
            elif "images" in s:
                text = f"{split} {s['images']:,} images"
            else:
                text = f"{split} {s['chars']:,} chars"
            if s.get("unknown_chars"):
                text += f", {s['unknown_chars']:,} unknown"
            parts.append(text)
        if m["vocab_size"]:
            vocab = f"vocab {m['vocab_size']} ids ({m['symbols']} symbols + specials)"
        else:
            vocab = f"{m['num_classes']} classes, 20 glimpses x 49 floats"
        how = "cached" if self.cached else f"prepared in {self.seconds:.1f} s"
        return f"{self.task}: {'; '.join(parts)}; {vocab}\n{how}: {self.path}"


@dataclass(frozen=True)
class Prepared:
    """A task's prepared data, as the trainer uses it."""

    task: str
    kind: str  # "stream" (ptb, text8), "sequences" (poems) or "glimpses" (mnist)
    path: Path  # the prepared folder
    meta: dict  # meta.json: counts, raw checksums, tokenizer ids
    vocab_size: int  # tokenizer ids (0 for mnist)
    num_classes: int | None  # mnist: 10; None for the language tasks
    tokenizer_path: Path | None  # sentencepiece model; checkpoints and exports carry its bytes
    splits: Mapping[str, Split]  # "train" / "valid" / "test"

    def tokenizer(self) -> Tokenizer | None:
        return Tokenizer.from_file(self.tokenizer_path) if self.tokenizer_path else None


def _task_dir(data_dir: Path | None, task: Task) -> Path:
    return Path(data_dir if data_dir is not None else default_data_dir()).expanduser() / task.name


def download(task: str | Task, data_dir: Path | None = None) -> list[Path]:
    """Make the task's raw files present and verified in DATA_DIR/<task>/; returns their paths."""
    t = get_task(task) if isinstance(task, str) else task
    paths = ensure_raw_files(t.raw_files, _task_dir(data_dir, t))
    return [paths[raw.name] for raw in t.raw_files]


def _folder(t: Task, cache_dir: Path | None, identity: dict) -> Path:
    root = Path(cache_dir if cache_dir is not None else cache.default_cache_dir()).expanduser()
    return root / t.name / cache.cache_key(t.name, identity, t.params)


def prepare(
    task: str | Task,
    data_dir: Path | None = None,
    force: bool = False,
    cache_dir: Path | None = None,
) -> Summary:
    """Verify (downloading what is missing) and tokenize/convert a task's data into the cache."""
    t = get_task(task) if isinstance(task, str) else task
    start = time.perf_counter()
    progress = show_progress()
    task_dir = _task_dir(data_dir, t)
    raw_paths = None
    if all(raw.sha256 for raw in t.raw_files):
        # The published checksums are the raw files' identity: no need to read them on a hit.
        identity = {raw.name: raw.sha256 for raw in t.raw_files}
    else:
        raw_paths = ensure_raw_files(t.raw_files, task_dir, progress=progress)
        identity = {raw.name: raw.sha256 or sha256_file(raw_paths[raw.name]) for raw in t.raw_files}
    folder = _folder(t, cache_dir, identity)
    meta = cache.read_meta(folder)
    if meta is not None and not force:
        return Summary(t.name, folder, meta, True, time.perf_counter() - start)
    if raw_paths is None:
        raw_paths = ensure_raw_files(t.raw_files, task_dir, progress=progress)
    with cache.building(folder, force=force) as tmp:
        meta = t.build(raw_paths, tmp, t.params, progress)
        meta = {
            "task": t.name,
            "kind": t.kind,
            "raw": {name: {"sha256": digest} for name, digest in identity.items()},
            "params": t.params,
            "seconds": round(time.perf_counter() - start, 2),
            **meta,
        }
        cache.write_meta(tmp, meta)  # last: a folder with meta.json is complete
    return Summary(t.name, folder, meta, False, time.perf_counter() - start)


def load(
    task: str | Task,
    data_dir: Path | None = None,
    cache_dir: Path | None = None,
) -> Prepared:
    """The task's prepared splits (memory-mapped), preparing them first if the cache lacks them."""
    summary = prepare(task, data_dir=data_dir, cache_dir=cache_dir)
    t = get_task(task) if isinstance(task, str) else task
    meta = summary.meta
    tok = meta.get("tokenizer")
    return Prepared(
        task=t.name,
        kind=t.kind,
        path=summary.path,
        meta=meta,
        vocab_size=meta["vocab_size"],
        num_classes=meta.get("num_classes"),
        tokenizer_path=summary.path / tok if tok else None,
        splits=t.open(summary.path, meta),
    )
