"""The prepared-data cache: where it lives, how it is keyed, and how a folder is written atomically.

Layout: `CACHE_DIR/<task>/<key>/` holds `meta.json`, the tokenizer (`tokenizer.model`, text
tasks) and one `.npy` per array, opened memory-mapped. The key is a hash of the format version,
the task, the identity of every raw file (its sha256, or what is verified where no sha256 is
published) and the split parameters: change any of them and a new folder is built beside the
old one. A folder is built under a temporary name and renamed into place, `meta.json` written
last, so a crash never leaves a half-written cache that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from serving.files import FolderExists, atomic_folder

CACHE_DIR_ENV = "NLSTM_CACHE_DIR"
# Bump when the layout or content of prepared folders changes: old caches are then ignored.
FORMAT_VERSION = 1
META = "meta.json"


def default_cache_dir() -> Path:
    """$NLSTM_CACHE_DIR, else a per-user cache folder
    ($XDG_CACHE_HOME or ~/.cache)/nlstm/prepared."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "nlstm" / "prepared"


def cache_key(task: str, raw_identity: dict, params: dict) -> str:
    """A short hash naming the prepared folder of `task` for these raw files and parameters."""
    blob = json.dumps(
        {"format": FORMAT_VERSION, "task": task, "raw": raw_identity, "params": params},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_meta(folder: Path) -> dict | None:
    """The meta.json of a complete prepared folder of this format version, else None."""
    try:
        meta = json.loads((folder / META).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return meta if meta.get("format_version") == FORMAT_VERSION else None


@contextmanager
def building(final: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it becomes `final` by one rename.

    With `force`, an existing `final` is replaced. If another process finished the same folder
    first, its copy is kept (the contents are the same by construction of the key).
    """
    try:
        with atomic_folder(final, replace=force) as tmp:
            yield tmp
    except FolderExists:
        if read_meta(final) is None:  # not a finished concurrent build: a real failure
            raise


def write_meta(folder: Path, meta: dict) -> None:
    meta = {"format_version": FORMAT_VERSION, **meta}
    (folder / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def new_array(folder: Path, name: str, shape: tuple[int, ...], dtype) -> np.memmap:
    """A writable memory-mapped `.npy` in `folder` (so big arrays never need to fit twice)."""
    return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)


def save_array(folder: Path, name: str, array: np.ndarray) -> None:
    np.save(folder / f"{name}.npy", np.ascontiguousarray(array))


def open_array(folder: Path, name: str) -> np.ndarray:
    """A read-only memory map of a cached array."""
    return np.load(folder / f"{name}.npy", mmap_mode="r")
