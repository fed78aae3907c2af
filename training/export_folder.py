"""An exported model's folder on disk: which targets may be replaced, and building one so that a
crash never leaves half of it.

A folder is built in a temporary folder beside the target and renamed into place
(serving.files.atomic_folder): a previous export is renamed aside first and removed last, so at
every moment the target is the old export, absent, or the new one. Any other non-empty folder
is refused, never replaced. Shared by `nlstm export` (training/export.py) and `nlstm quantize`
(training/quantize.py); imports no torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from serving.files import atomic_folder, atomic_write_bytes, atomic_write_text
from serving.formats import EXPORT_FORMAT, META_FILE, ExportMeta


def is_export_folder(path: Path) -> bool:
    try:
        return json.loads((path / META_FILE).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_target(out_dir: str | os.PathLike) -> None:
    """FileExistsError unless `out_dir` is absent, an empty folder or an export to replace."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise FileExistsError(f"{out_dir} exists and is not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_export_folder(out_dir):
        raise FileExistsError(
            f"{out_dir} is a folder that is not an exported model (no nlstm {META_FILE}); "
            "refusing to replace it: choose another --out or remove it"
        )


@contextmanager
def building(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder to fill; when the block ends without an exception it replaces
    `out_dir` by one rename (the target is checked again first: something may have appeared
    there meanwhile); on an exception it is removed and `out_dir` stays as it was."""
    check_target(out_dir)
    with atomic_folder(out_dir) as tmp:
        yield tmp
        check_target(out_dir)


def write_meta(meta: ExportMeta, path: Path) -> None:
    atomic_write_text(path, meta.to_json())


def write_graph(proto, path: Path) -> None:
    """One self-contained ONNX file: every initializer inside (protobuf's 2 GB limit is far off)."""
    atomic_write_bytes(path, proto.SerializeToString())


__all__ = ["building", "check_target", "is_export_folder", "write_graph", "write_meta"]
