"""serving/files.py: the one atomic-write helper of both sides (checkpoints, exports, data caches,
downloads, snapshots). A write appears whole or not at all; a failed one leaves the old file and
no temporary file behind."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from serving.files import (
    FolderExists,
    atomic_folder,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    replace_file,
    umask_mode,
)

REPO = Path(__file__).resolve().parents[1]


class Crash(Exception):
    pass


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writes_bytes_text_and_streams_with_open_s_permissions(tmp_path):
    target = tmp_path / "sub" / "a.bin"  # missing folders are made
    atomic_write_bytes(target, b"one")
    assert target.read_bytes() == b"one"
    atomic_write_bytes(target, lambda f: f.write(b"two"))  # a writer that streams into the file
    assert target.read_bytes() == b"two"
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    with atomic_open(tmp_path / "b.txt", "w", encoding="utf-8") as f:
        f.write("line\n")
    assert (tmp_path / "b.txt").read_text() == "line\n"
    # what open() would give (not mkstemp's private 0600): a non-root server reads checkpoints
    assert stat.S_IMODE(target.stat().st_mode) == umask_mode(0o666)
    assert _listing(tmp_path) == ["a.txt", "b.txt", "sub"] and _listing(tmp_path / "sub") == [
        "a.bin"
    ]


@pytest.mark.parametrize("how", ["bytes-writer", "open", "path", "replace"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, how):
    target = tmp_path / "last.pt"
    target.write_bytes(b"the old checkpoint")

    def half(f):
        f.write(b"half a new one")
        raise Crash

    with pytest.raises(Crash):
        if how == "bytes-writer":
            atomic_write_bytes(target, half)
        elif how == "open":
            with atomic_open(target) as f:
                half(f)
        elif how == "path":
            with atomic_path(target) as tmp:
                tmp.write_bytes(b"half a new one")
                raise Crash
        else:  # the rename itself fails (a full or read-only disk): the temporary is removed too

            def failing_replace(*a):
                raise Crash

            monkeypatch.setattr(os, "replace", failing_replace)
            atomic_write_bytes(target, b"a whole new one")
    assert target.read_bytes() == b"the old checkpoint"
    assert _listing(tmp_path) == ["last.pt"]


def test_atomic_path_hands_a_path_to_writers_that_want_one(tmp_path):
    with atomic_path(tmp_path / "model.onnx") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.onnx.") and tmp.exists()
        tmp.write_bytes(b"graph")
        assert not (tmp_path / "model.onnx").exists()  # nothing at the target until the end
    assert (tmp_path / "model.onnx").read_bytes() == b"graph" and _listing(tmp_path) == [
        "model.onnx"
    ]
    with (
        pytest.raises(ValueError, match="mode must be 'w' or 'wb'"),
        atomic_open(tmp_path / "x", "a"),
    ):
        pass


def test_replace_file_installs_a_verified_temporary(tmp_path):
    tmp = tmp_path / ".download-1.part"
    tmp.write_bytes(b"raw data")
    replace_file(tmp, tmp_path / "raw.txt", 0o644)
    assert (tmp_path / "raw.txt").read_bytes() == b"raw data" and not tmp.exists()
    assert stat.S_IMODE((tmp_path / "raw.txt").stat().st_mode) == umask_mode(0o644)


def test_atomic_folder_publishes_replaces_or_refuses(tmp_path):
    out = tmp_path / "export"
    with atomic_folder(out) as tmp:
        (tmp / "model.onnx").write_bytes(b"v1")
        assert not out.exists()
    assert (out / "model.onnx").read_bytes() == b"v1"
    assert stat.S_IMODE(out.stat().st_mode) == umask_mode(0o777)  # not mkdtemp's 0700
    with pytest.raises(Crash), atomic_folder(out) as tmp:
        (tmp / "model.onnx").write_bytes(b"half of v2")
        raise Crash
    assert (out / "model.onnx").read_bytes() == b"v1" and _listing(tmp_path) == ["export"]
    with atomic_folder(out) as tmp:  # replace: the old folder is renamed aside, removed last
        (tmp / "model.onnx").write_bytes(b"v2")
    assert _listing(out) == ["model.onnx"] and (out / "model.onnx").read_bytes() == b"v2"
    assert _listing(tmp_path) == ["export"]
    with pytest.raises(FolderExists), atomic_folder(out, replace=False) as tmp:
        (tmp / "model.onnx").write_bytes(b"v3")
    assert (out / "model.onnx").read_bytes() == b"v2" and _listing(tmp_path) == ["export"]


def test_imports_no_torch():
    code = "import sys, serving.files; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.strip() == "False"
