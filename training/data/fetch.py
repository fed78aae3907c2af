"""Raw data files: where they come from, how they are verified, and fetching the missing ones.

A raw file lives at `DATA_DIR/<task>/<name>` (the layout of `../shared/data`). `ensure_raw_files`
verifies every file that is there and downloads the missing ones from their canonical public
location: to a temporary name in the same folder, verified, then renamed into place, so a
partial or corrupt download never sits under the final name. Offline (or with the folder
read-only) it fails with a message naming the file, its expected checksum, the URL and where to
put it. There is no fallback: a file that is missing and cannot be fetched is an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from serving.files import replace_file

# defined on the serving side, whose `nlstm classify` reads the MNIST files there too; the data
# pipeline and the tests import default_data_dir from here
from serving.formats import DATA_DIR_ENV, default_data_dir  # noqa: F401

_CHUNK = 1 << 20


class DownloadError(OSError):
    """A raw file is missing and could not be downloaded (offline, unreachable, read-only dir)."""


class ChecksumError(ValueError):
    """A raw file does not have the content it must have (sha256, size or format)."""


@dataclass(frozen=True)
class RawFile:
    """One raw file a task needs, and how to get and verify it.

    sha256 is the identity of the file; where no checksum is published (text8.zip), `size` and
    `check` carry the verification instead and the docs say exactly what is verified.
    """

    name: str  # file name under DATA_DIR/<task>/
    url: str  # canonical public location (of the file, or of the archive holding it)
    sha256: str | None = None  # expected sha256 of the file itself
    size: int | None = None  # expected size in bytes
    member: str | None = (
        None  # path inside the archive at `url` (.tgz/.tar.gz/.zip); None: `url` is the file
    )
    check: Callable[[Path], None] | None = None  # extra content check; raises ChecksumError

    def __post_init__(self):
        if self.sha256 is None and self.size is None and self.check is None:
            raise ValueError(f"raw file {self.name}: give at least one of sha256, size or check")

    def describe(self) -> str:
        """What the file must be, for error messages."""
        if self.sha256:
            return f"sha256 {self.sha256}"
        return f"size {self.size:,} bytes" if self.size is not None else "a content check"


def show_progress() -> bool:
    """Progress bars only when someone is watching: stderr is a terminal."""
    return sys.stderr.isatty()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify(raw: RawFile, path: Path) -> str:
    """Check `path` against `raw`; returns its sha256. Raises ChecksumError naming what differs."""
    size = path.stat().st_size
    if raw.size is not None and size != raw.size:
        raise ChecksumError(f"{path} has {size:,} bytes; {raw.name} must have {raw.size:,} bytes")
    digest = sha256_file(path)
    if raw.sha256 is not None and digest != raw.sha256:
        raise ChecksumError(f"{path} has sha256 {digest}; {raw.name} must have sha256 {raw.sha256}")
    if raw.check is not None:
        raw.check(path)
    return digest


def ensure_raw_files(
    files: Sequence[RawFile], task_dir: Path, *, progress: bool | None = None
) -> dict[str, Path]:
    """Make every file of `files` present and verified under `task_dir`; returns name -> path.

    Files already there are verified (a corrupt one is an error naming it; it is not replaced
    behind the user's back). Missing ones are downloaded, each archive once.
    """
    progress = show_progress() if progress is None else progress
    task_dir = Path(task_dir)
    paths = {raw.name: task_dir / raw.name for raw in files}
    missing = [raw for raw in files if not paths[raw.name].exists()]
    for raw in files:
        if raw in missing:
            continue
        try:
            verify(raw, paths[raw.name])
        except ChecksumError as exc:
            raise ChecksumError(
                f"{exc}. The file is corrupt or a different version: delete it to have it "
                f"downloaded again from {raw.url}"
            ) from None
    by_url: dict[str, list[RawFile]] = {}
    for raw in missing:
        by_url.setdefault(raw.url, []).append(raw)
    for url, group in by_url.items():
        _fetch(url, group, task_dir, progress)
    return paths


def _offline_message(group: Sequence[RawFile], task_dir: Path, url: str, reason: str) -> str:
    wanted = "; ".join(f"{raw.name} ({raw.describe()})" for raw in group)
    where = (
        f"extract {', '.join(raw.member or raw.name for raw in group)} from that archive"
        if group[0].member
        else "download it yourself"
    )
    return (
        f"cannot download {url} ({reason}). Needed: {wanted}. "
        f"To prepare offline, {where} and put the file(s) in {task_dir}/, "
        f"or pass --data-dir DIR (or set ${DATA_DIR_ENV}) where DIR/{task_dir.name}/ holds them"
    )


def _make_dirs(folder: Path) -> list[Path]:
    """mkdir -p that returns the folders it created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    created = []
    for f in reversed(missing):
        try:
            f.mkdir()
        except FileExistsError:  # made meanwhile by another process: not ours to remove
            continue
        created.append(f)
    return created


def _remove_empty(created: list[Path]) -> None:
    """Undo _make_dirs for a download that failed: a failing command leaves no empty folders
    behind (the data folder may be shared); folders something else filled stay."""
    for f in reversed(created):
        with contextlib.suppress(OSError):
            f.rmdir()


def _fetch(url: str, group: Sequence[RawFile], task_dir: Path, progress: bool) -> None:
    created: list[Path] = []
    try:
        created = _make_dirs(task_dir)
        fd, tmp_name = tempfile.mkstemp(dir=task_dir, prefix=".download-", suffix=".part")
    except OSError as exc:
        _remove_empty(created)
        raise DownloadError(
            _offline_message(group, task_dir, url, f"cannot write there: {exc}")
        ) from None
    tmp = Path(tmp_name)
    ok = False
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                _download_to(url, out, progress)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise DownloadError(_offline_message(group, task_dir, url, str(reason))) from None
        if group[0].member is None:
            (raw,) = group  # a plain URL is one file
            _install(raw, tmp, task_dir / raw.name)
        else:
            for raw in group:
                member_tmp = _extract(tmp, raw, task_dir)
                try:
                    _install(raw, member_tmp, task_dir / raw.name)
                finally:
                    member_tmp.unlink(missing_ok=True)
        ok = True
    finally:
        tmp.unlink(missing_ok=True)
        if not ok:
            _remove_empty(created)


def _download_to(url: str, out, progress: bool) -> None:
    with urllib.request.urlopen(url, timeout=60) as resp:
        total = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
        with tqdm(
            total=int(total) if total else None,
            desc=f"download {url.rsplit('/', 1)[-1]}",
            unit="B",
            unit_scale=True,
            disable=not progress,
        ) as bar:
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))


def _extract(archive: Path, raw: RawFile, task_dir: Path) -> Path:
    """Copy `raw.member` out of `archive` into a temporary file in `task_dir`."""
    member = raw.member
    if member is None:
        raise ValueError(f"{raw.name} is a file of its own, not a member of {archive}")
    fd, name = tempfile.mkstemp(dir=task_dir, prefix=".extract-", suffix=".part")
    dest = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as zf:
                    try:
                        src = zf.open(member)
                    except KeyError:
                        raise ChecksumError(f"{raw.url} has no member {raw.member}") from None
                    with src:
                        shutil.copyfileobj(src, out, _CHUNK)
            else:
                if not tarfile.is_tarfile(archive):
                    raise ChecksumError(f"{raw.url} is neither a zip nor a tar archive")
                with tarfile.open(archive) as tf:
                    # Archives name members "data/x" or "./data/x": accept either spelling.
                    info = next(
                        (
                            m
                            for m in tf.getmembers()
                            if m.name.removeprefix("./") == member.removeprefix("./")
                        ),
                        None,
                    )
                    member_file = tf.extractfile(info) if info is not None else None
                    if member_file is None:
                        raise ChecksumError(f"{raw.url} has no file member {raw.member}")
                    with member_file:
                        shutil.copyfileobj(member_file, out, _CHUNK)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def _install(raw: RawFile, tmp: Path, final: Path) -> None:
    """Verify the downloaded `tmp`, then atomically rename it to `final`; a bad file is deleted."""
    try:
        verify(raw, tmp)
    except ChecksumError as exc:
        tmp.unlink(missing_ok=True)
        raise ChecksumError(f"downloaded file rejected and deleted: {exc}") from None
    replace_file(tmp, final, 0o644)  # mkstemp makes files private; raw data is not
