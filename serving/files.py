"""Atomic file writes: a reader or a crash never sees half a file.

Every write goes to a temporary file beside the target, is flushed and fsynced, gets the
permissions open() would give (less the umask, not mkstemp's private 0600) and is renamed over
the target with os.replace; then the folder is fsynced so that the rename itself is durable. An
exception while writing removes the temporary file and leaves the old target as it was. A
SIGKILL (nothing runs after it) leaves the temporary file, named `.{name}.XXXXXXXX.tmp`:
`remove_stale_temporaries` clears those where no write can be in flight (a run starting).

    atomic_write_bytes(path, data)         bytes, or a callable write(file) that streams them
    atomic_write_text(path, text)
    with atomic_open(path, "w") as f: ...  a file object for writers that want one
    with atomic_path(path) as tmp: ...     a temporary path for writers that want a path
    with atomic_folder(path) as tmp: ...   a folder, published by one rename (exports, caches)

Both sides use it (training's checkpoints, exports, data caches; serving's snapshots), so it
imports nothing but the standard library: serving never imports torch.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any


def umask_mode(mode: int) -> int:
    """`mode` less the process's umask: the permissions open() or mkdir() would give.
    tempfile's files (0600) and folders (0700) are private; what is renamed into place from them
    gets these instead, so that another user (a container's non-root server) can read it."""
    return mode & ~_umask()


def _umask() -> int:
    try:  # Linux: read it, instead of setting and restoring it (racy with other threads)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_pattern(name: str) -> re.Pattern:
    """The names this module gives its temporary files for the target `name`: mkstemp's
    prefix + 8 random characters (tempfile's alphabet: a-z, 0-9 and _) + suffix."""
    return re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp")


def _temporary(path: Path) -> tuple[int, Path]:
    # keep in step with temporary_pattern, which finds the files a SIGKILL leaves behind
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    return fd, Path(tmp)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def replace_file(tmp: str | os.PathLike, path: str | os.PathLike, mode: int = 0o666) -> None:
    """The last step of every atomic write: fsync `tmp`, give it `mode` less the umask, rename
    it over `path` and fsync the folder. For a writer that made its own temporary file in the
    target's folder (a download, verified before it is installed)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, umask_mode(mode))
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that wants a file name (an onnx save,
    a download); on a clean exit its file is fsynced and renamed over `path`, on an exception
    it is removed. The file exists (empty) when the block starts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary(path)
    os.close(fd)
    try:
        yield tmp
        replace_file(tmp, path, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike,
    mode: str = "wb",
    *,
    encoding: str | None = None,
    perms: int = 0o666,
    durable: bool = True,
) -> Iterator[IO[Any]]:
    """`open(path, mode)` whose writes appear at `path` all at once when the block ends without
    an exception (and never otherwise). mode: "w" or "wb". durable=False skips the fsyncs (of
    the file and of its folder): readers still see the old file or the whole new one, but a
    machine crash may lose the write or leave an empty file; for small files that are rewritten
    often and mean nothing after a crash (the file session store's leases)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, umask_mode(perms))
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes | Callable[[IO[bytes]], object]
) -> None:
    """Write `data` to `path` atomically; `data` may be the bytes or a callable write(file)
    that streams them (torch.save, a serializer) into the open temporary file."""
    with atomic_open(path, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data)


def atomic_write_text(
    path: str | os.PathLike, text: str, encoding: str = "utf-8", *, durable: bool = True
) -> None:
    """Write `text` to `path` atomically (durable: see atomic_open)."""
    with atomic_open(path, "w", encoding=encoding, durable=durable) as f:
        f.write(text)


class FolderExists(FileExistsError):
    """atomic_folder(replace=False) found its target already there when it came to publish."""


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `path` to fill; on a clean exit it becomes `path` by one
    rename, on an exception it is removed. With `replace`, an existing `path` is first renamed
    aside and removed last, so at every moment `path` is the old folder, absent, or the new
    one; without it a `path` that is there (and not an empty folder) raises FolderExists, and
    the new folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tmp.chmod(umask_mode(0o777))  # mkdtemp's folder is private (0700); what we publish is not
        yield tmp
        old = None
        if replace and (path.exists() or path.is_symlink()):
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)  # onto an existing folder only when that one is empty
        except OSError as exc:
            if not replace and path.exists():
                raise FolderExists(f"{path} already exists") from exc
            raise
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files this module left in `folder` for the targets `names` (e.g.
    "last.pt") when a SIGKILL stopped a write before its rename; returns them.

    Only the exact pattern `.{name}.XXXXXXXX.tmp` is touched, never another file. Call it only
    where no write to those targets can be in flight (a run that is starting), since a live
    write's temporary file has the same name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = [temporary_pattern(n) for n in names]
    removed = []
    for entry in sorted(folder.iterdir()):
        if (
            any(p.fullmatch(entry.name) for p in patterns)
            and entry.is_file()
            and not entry.is_symlink()
        ):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


__all__ = [
    "FolderExists",
    "atomic_folder",
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "remove_stale_temporaries",
    "replace_file",
    "temporary_pattern",
    "umask_mode",
]
