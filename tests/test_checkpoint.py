"""Checkpoints: round trip, atomic writes, clear errors for corrupt or foreign files."""

from __future__ import annotations

import os

import pytest
import torch

from training.checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from training.models import ModelConfig, build_model


def _ckpt(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(kind="char", core="nlstm", hidden_size=8, depth=2, vocab_size=7)
    model = build_model(cfg)
    return Checkpoint(
        task="ptb",
        model_config=cfg,
        model=model.state_dict(),
        tokenizer=b"\x00sp",
        train_config={"lr": 0.002},
        step=5,
        epoch=1,
        metrics={"valid_bpc": 1.5},
        rng={"torch": torch.get_rng_state()},
    )


def test_round_trip(tmp_path):
    ck = _ckpt()
    save_checkpoint(ck, tmp_path / "last.pt")
    back = load_checkpoint(tmp_path / "last.pt")
    assert back.model_config == ck.model_config and back.tokenizer == b"\x00sp"
    assert back.step == 5 and back.metrics == {"valid_bpc": 1.5}
    for k, v in ck.model.items():
        assert torch.equal(back.model[k], v)
    model = back.build_model()
    assert isinstance(model, torch.nn.Module)


def test_checkpoints_get_the_umask_permissions_not_the_temporary_files(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(_ckpt(), tmp_path / "last.pt")
        os.umask(0o077)
        save_checkpoint(_ckpt(), tmp_path / "private.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600
    assert (tmp_path / "private.pt").stat().st_mode & 0o777 == 0o600


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(_ckpt(0), path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # a kill in the middle of writing

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_ckpt(1), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind
    load_checkpoint(path)


def test_corrupt_and_foreign_files_get_clear_errors(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(_ckpt(), path)
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable nlstm checkpoint"):
        load_checkpoint(tmp_path / "trunc.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an nlstm checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"format": "nlstm-checkpoint", "version": 99}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "new.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_remove_stale_temporaries_takes_only_the_exact_pattern(tmp_path, monkeypatch):
    # a SIGKILL just before the rename: the temporary file stays (tests/test_trainer.py kills a
    # real writer); here the rename is skipped instead
    monkeypatch.setattr(os, "replace", lambda *a: None)
    atomic_write_bytes(tmp_path / "last.pt", lambda f: f.write(b"a whole checkpoint"))
    monkeypatch.undo()
    (left,) = [p.name for p in tmp_path.iterdir()]
    assert left.startswith(".last.pt.") and left.endswith(".tmp")
    keep = [
        ".last.pt.tmp",
        ".last.pt.abc.tmp",
        ".last.pt.abcdefgh.tmp.bak",
        "last.pt.abcdefgh.tmp",
        ".other.pt.abcdefgh.tmp",
        ".last.pt.ABCDEFGH.tmp",
        "notes.tmp",
        "best.pt",
    ]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".best.pt.k_9zq0xy.tmp").mkdir()  # a folder is never deleted
    (tmp_path / ".best.pt.a1b2c3d4.tmp").write_bytes(b"y")
    removed = remove_stale_temporaries(tmp_path, ("last.pt", "best.pt"))
    assert sorted(p.name for p in removed) == sorted([left, ".best.pt.a1b2c3d4.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, ".best.pt.k_9zq0xy.tmp"])
    assert remove_stale_temporaries(tmp_path / "absent", ("last.pt",)) == []
