"""Raw-file fetching: checksums, corrupt files rejected, atomic installs, archives, offline errors.

Downloads are served from local file:// URLs; "offline" is a patched urlopen that raises.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import pytest

from training import data
from training.data import ptb
from training.data.fetch import ChecksumError, DownloadError, RawFile, ensure_raw_files

# `training.data.fetch` the attribute is the download() function; the module is this:
dl = importlib.import_module("training.data.fetch")
CONTENT = b"hello, raw data\n" * 100


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def serve(tmp_path: Path, name: str, content: bytes) -> str:
    src = tmp_path / "server"
    src.mkdir(exist_ok=True)
    (src / name).write_bytes(content)
    return (src / name).as_uri()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def offline(*args, **kwargs):
    raise urllib.error.URLError("network is unreachable")


def test_missing_file_is_downloaded_verified_and_installed(tmp_path):
    raw = RawFile(
        "a.txt", serve(tmp_path, "a.txt", CONTENT), sha256=sha(CONTENT), size=len(CONTENT)
    )
    paths = ensure_raw_files([raw], tmp_path / "data" / "task", progress=False)
    assert paths["a.txt"].read_bytes() == CONTENT
    assert leftovers(tmp_path / "data" / "task") == []
    # Present and valid: verified again, not downloaded again (the source may disappear).
    (tmp_path / "server" / "a.txt").unlink()
    assert ensure_raw_files([raw], tmp_path / "data" / "task", progress=False) == paths


def test_download_with_wrong_checksum_is_rejected_and_not_left_behind(tmp_path):
    raw = RawFile("a.txt", serve(tmp_path, "a.txt", CONTENT), sha256=sha(b"something else"))
    dest = tmp_path / "data"
    with pytest.raises(ChecksumError) as err:
        ensure_raw_files([raw], dest, progress=False)
    msg = str(err.value)
    assert "rejected and deleted" in msg and sha(CONTENT) in msg and sha(b"something else") in msg
    assert not dest.exists()  # neither the final name, a temporary file nor the folder it made


def test_download_with_wrong_size_is_rejected(tmp_path):
    raw = RawFile("a.txt", serve(tmp_path, "a.txt", CONTENT), size=len(CONTENT) + 1)
    with pytest.raises(ChecksumError, match=f"has {len(CONTENT):,} bytes; a.txt must have"):
        ensure_raw_files([raw], tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists()


def test_corrupt_existing_file_is_rejected_and_kept_for_the_user(tmp_path):
    dest = tmp_path / "data"
    dest.mkdir()
    corrupt = CONTENT[:-1] + b"X"
    (dest / "a.txt").write_bytes(corrupt)
    raw = RawFile("a.txt", serve(tmp_path, "a.txt", CONTENT), sha256=sha(CONTENT))
    with pytest.raises(ChecksumError, match="delete it to have it downloaded again") as err:
        ensure_raw_files([raw], dest, progress=False)
    assert sha(corrupt) in str(err.value) and sha(CONTENT) in str(err.value)
    assert (dest / "a.txt").read_bytes() == corrupt


def test_members_come_out_of_a_tgz_fetched_once(tmp_path, monkeypatch):
    files = {"data/x.txt": b"x" * 10, "data/y.txt": b"y" * 20}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, content in files.items():
            info = tarfile.TarInfo("./archive/" + name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    url = serve(tmp_path, "archive.tgz", buf.getvalue())
    opened = []
    real = dl.urllib.request.urlopen
    monkeypatch.setattr(
        dl.urllib.request, "urlopen", lambda u, **kw: opened.append(u) or real(u, **kw)
    )
    raws = [
        RawFile(Path(n).name, url, sha256=sha(c), member="archive/" + n) for n, c in files.items()
    ]
    paths = ensure_raw_files(raws, tmp_path / "data", progress=False)
    assert opened == [url]
    assert {p.read_bytes() for p in paths.values()} == set(files.values())
    assert leftovers(tmp_path / "data") == []


def test_member_out_of_a_zip_and_a_missing_member(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("inner", CONTENT)
    url = serve(tmp_path, "a.zip", buf.getvalue())
    ok = RawFile("inner.txt", url, sha256=sha(CONTENT), member="inner")
    assert (
        ensure_raw_files([ok], tmp_path / "d1", progress=False)["inner.txt"].read_bytes() == CONTENT
    )
    missing = RawFile("other.txt", url, sha256=sha(CONTENT), member="other")
    with pytest.raises(ChecksumError, match="has no member other"):
        ensure_raw_files([missing], tmp_path / "d2", progress=False)
    assert not (tmp_path / "d2").exists()  # the failed fetch removed the folder it made


def test_offline_error_names_file_checksum_url_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(dl.urllib.request, "urlopen", offline)
    raw = RawFile("a.txt", "https://example.org/a.txt", sha256=sha(CONTENT))
    dest = tmp_path / "data" / "task"
    with pytest.raises(DownloadError) as err:
        ensure_raw_files([raw], dest, progress=False)
    msg = str(err.value)
    for part in (
        "a.txt",
        sha(CONTENT),
        "https://example.org/a.txt",
        str(dest),
        "network is unreachable",
        "--data-dir",
    ):
        assert part in msg
    assert isinstance(err.value, OSError)  # the CLI prints OSError/ValueError as one line
    assert not dest.exists()  # nothing left behind, not even the folders it made


def test_unwritable_data_dir_is_a_download_error(tmp_path, monkeypatch):
    def no_write(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(dl.tempfile, "mkstemp", no_write)
    raw = RawFile("a.txt", "https://example.org/a.txt", sha256=sha(CONTENT))
    with pytest.raises(DownloadError, match="cannot write there: read-only file system"):
        ensure_raw_files([raw], tmp_path, progress=False)


def test_prepare_offline_names_every_ptb_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dl.urllib.request, "urlopen", offline)
    with pytest.raises(DownloadError) as err:
        data.prepare("ptb", data_dir=tmp_path / "raw", cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert ptb.ARCHIVE_URL in msg and "extract" in msg
    for raw in ptb.RAW_FILES:
        assert raw.name in msg and raw.sha256 in msg and raw.member in msg
    assert str(tmp_path / "raw" / "ptb") in msg
    assert not (tmp_path / "cache").exists()


def test_cli_prints_the_offline_error_as_one_line(tmp_path, monkeypatch, capsys):
    from training.cli import main

    monkeypatch.setattr(dl.urllib.request, "urlopen", offline)
    rc = main(["data", "download", "poems", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("nlstm data: error: cannot download https://raw.githubusercontent.com/")
    assert "ac03c5fbb07776f0e43cb1ccfc74732f5313ab3d832df81c8e0db327df35e666" in err
    assert err.count("\n") == 1


def test_a_failed_prepare_creates_no_folders(tmp_path, monkeypatch, capsys):
    """`nlstm data prepare ptb --data-dir DATA/ptb` (one level too deep) offline: the error, and
    DATA/ptb (a shared, maybe read-only data folder) left as it was, with no empty ptb/ptb/."""
    from training.cli import main

    monkeypatch.setattr(dl.urllib.request, "urlopen", offline)
    shared = tmp_path / "data" / "ptb"
    shared.mkdir(parents=True)
    rc = main(
        [
            "data",
            "prepare",
            "ptb",
            "--data-dir",
            str(shared),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert rc == 2 and "cannot download" in capsys.readouterr().err
    assert list(shared.iterdir()) == [] and not (tmp_path / "cache").exists()
    with pytest.raises(DownloadError):  # every folder it created is removed, the deepest first
        ensure_raw_files(ptb.RAW_FILES, tmp_path / "new" / "a" / "ptb", progress=False)
    assert not (tmp_path / "new").exists()


def test_unknown_task_lists_the_allowed_ones():
    with pytest.raises(
        ValueError, match="unknown task 'ptb2'; choose one of ptb, text8, poems, mnist"
    ):
        data.prepare("ptb2")


def test_default_dirs_follow_the_environment(monkeypatch, tmp_path):
    from training.data.cache import default_cache_dir
    from training.data.fetch import default_data_dir

    monkeypatch.setenv("NLSTM_DATA_DIR", str(tmp_path / "raw"))
    monkeypatch.setenv("NLSTM_CACHE_DIR", str(tmp_path / "prep"))
    assert default_data_dir() == tmp_path / "raw" and default_cache_dir() == tmp_path / "prep"
    monkeypatch.delenv("NLSTM_DATA_DIR")
    monkeypatch.delenv("NLSTM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "nlstm" / "raw"
    assert default_cache_dir() == tmp_path / "xdg" / "nlstm" / "prepared"
