"""The trainer resuming, on small synthetic data: a resumed, killed (between any two steps,
between evaluation and checkpoint, while writing, by SIGKILL) or extended run ends bit-identical
to an uninterrupted one; runs that cannot resume say why; carry_state changes training;
init_from starts a fresh run from another run's weights and refuses one that does not fit.
The uninterrupted runs that the others must equal are trained once per module (the
`uninterrupted` fixture). tests/test_trainer.py says what these runs cost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from trainer_runs import QUIET, Kill, kill_at, prepared_stream, run_config, same_weights, weights_of

from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.config import ConfigError
from training.testing.data import glimpses_prepared
from training.trainer import BEST, LAST, METRICS, read_metrics, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return prepared_stream(tmp_path_factory.mktemp("stream"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, stream):
    """Uninterrupted runs of run_config() for 1 and 2 epochs, trained once for the module: what the
    resumed, killed and extended runs below must end equal to. Tests read them, never write
    them (checkpoint_every changes neither the weights nor the evaluations: saving draws no
    random numbers)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    for epochs in (1, 2):
        train(run_config(epochs=epochs), root / f"epochs{epochs}", prepared=stream, **QUIET)
    return {1: root / "epochs1", 2: root / "epochs2"}


def _figures_only(evals):
    drop = ("train_items_per_s", "elapsed_s")
    return [{k: v for k, v in e.items() if k not in drop} for e in evals]


# --------------------------------------------------------------------------------- resuming
def test_resume_after_max_steps_is_bit_identical(tmp_path, stream, uninterrupted):
    cfg = run_config(checkpoint_every=7)
    a = uninterrupted[2]
    s = train(replace(cfg, max_steps=45), tmp_path / "b", prepared=stream, **QUIET)
    assert s["stopped"] == "max_steps" and s["step"] == 45
    s = train(cfg, tmp_path / "b", prepared=stream, resume=True, **QUIET)
    assert s["stopped"] == "done"
    assert same_weights(weights_of(a), weights_of(tmp_path / "b"))
    _, ea = read_metrics(a)
    _, eb = read_metrics(tmp_path / "b")

    # b also evaluated where it stopped (so its next train_bpc covers fewer steps); the
    # validation and test figures of every other evaluation are the same
    def held_out(es):
        return [{k: v for k, v in e.items() if "valid" in k or "test" in k} for e in es]

    assert held_out(ea) == held_out([e for e in eb if e["step"] != 45])


@pytest.mark.parametrize("kind", ["stream", "glimpses"])
def test_a_killed_run_resumes_bit_identical(tmp_path, stream, uninterrupted, kind):
    if kind == "stream":
        prepared, cfg = stream, run_config(checkpoint_every=10)
        a = uninterrupted[2]
    else:
        prepared = glimpses_prepared(tmp_path)
        cfg = run_config(
            task="mnist",
            batch_size=24,
            epochs=3,
            checkpoint_every=4,
            optimizer={"name": "rmsprop", "lr": 0.003},
        )
        a = tmp_path / "a"
        train(cfg, a, prepared=prepared, **QUIET)
    with pytest.raises(Kill):  # killed after step 23's update, before it was saved
        train(cfg, tmp_path / "b", prepared=prepared, on_step=kill_at(23), **QUIET)
    saved = load_checkpoint(tmp_path / "b" / LAST).step
    assert saved < 23  # the resumed run must redo some steps
    train(cfg, tmp_path / "b", prepared=prepared, resume=True, **QUIET)
    assert same_weights(weights_of(a), weights_of(tmp_path / "b"))
    _, ea = read_metrics(a)
    _, eb = read_metrics(tmp_path / "b")
    assert _figures_only(ea) == _figures_only(eb)  # no duplicated or lost evaluations


def test_killed_between_evaluation_and_checkpoint(tmp_path, stream, uninterrupted, monkeypatch):
    """A metrics line was written, its checkpoint was not: resume drops the line, redoes it."""
    cfg = run_config()
    import training.trainer as tr

    real = tr.Trainer._save_last
    calls = {"n": 0}

    def dying_save(self):
        calls["n"] += 1
        if calls["n"] == 2:  # the end of epoch 2: after its metrics line
            raise Kill
        real(self)

    monkeypatch.setattr(tr.Trainer, "_save_last", dying_save)
    with pytest.raises(Kill):
        train(cfg, tmp_path / "b", prepared=stream, **QUIET)
    monkeypatch.setattr(tr.Trainer, "_save_last", real)
    train(cfg, tmp_path / "b", prepared=stream, resume=True, **QUIET)
    assert same_weights(weights_of(uninterrupted[2]), weights_of(tmp_path / "b"))
    lines = (tmp_path / "b" / METRICS).read_text().splitlines()
    types = [json.loads(x)["type"] for x in lines]
    assert types == ["run", "eval", "resume", "eval"]


def test_a_kill_while_writing_leaves_the_previous_checkpoint(
    tmp_path, stream, uninterrupted, monkeypatch
):
    cfg = run_config(checkpoint_every=10)
    run = tmp_path / "b"
    with pytest.raises(Kill):
        train(cfg, run, prepared=stream, on_step=kill_at(15), **QUIET)
    before = (run / LAST).read_bytes()

    def torn_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise Kill  # killed in the middle of writing

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(Kill):
        train(cfg, run, prepared=stream, resume=True, **QUIET)
    monkeypatch.undo()
    assert (run / LAST).read_bytes() == before  # the previous checkpoint, intact
    assert sorted(p.name for p in run.iterdir()) == [LAST, METRICS]  # no temporary left behind
    train(cfg, run, prepared=stream, resume=True, **QUIET)
    assert same_weights(weights_of(uninterrupted[2]), weights_of(run))


# Writes the bytes of argv[2] to argv[1] through atomic_write_bytes, says so, and sleeps in the
# writer, after the last byte and before fsync and the rename, until the test SIGKILLs it.
KILLED_WRITER = r"""
import sys, time
from training.checkpoint import atomic_write_bytes
blob = open(sys.argv[2], "rb").read()
def write(f):
    f.write(blob)
    f.flush()
    print("written", flush=True)
    time.sleep(600)
atomic_write_bytes(sys.argv[1], write)
"""


def _temporaries(run: Path) -> list[Path]:
    return sorted(p for p in run.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def test_a_sigkill_mid_write_keeps_the_checkpoint_and_the_next_run_removes_the_leftover(
    tmp_path, stream
):
    cfg = run_config(epochs=1, checkpoint_every=3)
    train(replace(cfg, max_steps=9), tmp_path / "a", prepared=stream, **QUIET)
    run = tmp_path / "b"
    train(replace(cfg, max_steps=6), run, prepared=stream, **QUIET)
    before = (run / LAST).read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(run / LAST), str(run / BEST)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        },
    )
    try:
        line = proc.stdout.readline()  # the whole new checkpoint is in the temporary file
        assert line.strip() == "written", line or proc.stderr.read()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    (left,) = _temporaries(run)
    assert left.name.startswith(f".{LAST}.") and left.stat().st_size == len(
        (run / BEST).read_bytes()
    )
    assert (run / LAST).read_bytes() == before  # the previous checkpoint, intact and loadable
    assert load_checkpoint(run / LAST).step == 6
    # a fresh run in a folder holding only such a leftover removes it too
    fresh = tmp_path / "c"
    fresh.mkdir()
    shutil.copy(left, fresh / f".{BEST}.{left.name.split('.')[-2]}.tmp")
    train(replace(cfg, max_steps=1), fresh, prepared=stream, **QUIET)
    assert not _temporaries(fresh)
    logs = []
    s = train(
        replace(cfg, max_steps=9),
        run,
        prepared=stream,
        resume=True,
        log=logs.append,
        progress=False,
    )
    assert s["step"] == 9 and not _temporaries(run)
    assert sorted(p.name for p in run.iterdir()) == sorted([LAST, BEST, METRICS])
    assert any(left.name in line and "removed" in line for line in logs), logs
    assert same_weights(weights_of(tmp_path / "a"), weights_of(run))


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path, stream, uninterrupted):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / METRICS).write_text('{"type": "run"}\n')  # killed before any checkpoint
    train(run_config(epochs=1), tmp_path / "b", prepared=stream, resume=True, **QUIET)
    assert same_weights(weights_of(uninterrupted[1]), weights_of(tmp_path / "b"))
    assert [json.loads(x)["type"] for x in (tmp_path / "b" / METRICS).read_text().splitlines()] == [
        "run",
        "eval",
    ]


def test_a_finished_run_resumes_to_nothing_and_can_be_extended(tmp_path, stream, uninterrupted):
    shutil.copytree(uninterrupted[1], tmp_path / "a")  # a finished one-epoch run
    s = train(run_config(epochs=1), tmp_path / "a", prepared=stream, resume=True, **QUIET)
    assert s["stopped"] == "done" and s["epoch"] == 1
    train(
        run_config(epochs=2), tmp_path / "a", prepared=stream, resume=True, **QUIET
    )  # epochs may grow
    assert same_weights(weights_of(tmp_path / "a"), weights_of(uninterrupted[2]))


def test_resume_refuses_another_config(tmp_path, stream):
    train(run_config(epochs=1, max_steps=5), tmp_path, prepared=stream, **QUIET)
    with pytest.raises(ConfigError, match=r"optimizer\.lr: 0\.002 -> 0\.001.*may change on resume"):
        train(run_config(optimizer={"lr": 0.001}), tmp_path, prepared=stream, resume=True, **QUIET)


def test_an_existing_run_needs_resume(tmp_path, stream):
    train(run_config(epochs=1, max_steps=2), tmp_path, prepared=stream, **QUIET)
    with pytest.raises(ValueError, match=r"already holds a run.*--resume"):
        train(run_config(epochs=1), tmp_path, prepared=stream, **QUIET)


def test_corrupt_or_foreign_last_checkpoint(tmp_path, stream):
    train(run_config(epochs=1, max_steps=2), tmp_path, prepared=stream, **QUIET)
    last = tmp_path / LAST
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="not a readable nlstm checkpoint"):
        train(run_config(epochs=1), tmp_path, prepared=stream, resume=True, **QUIET)
    torch.save({"model": {}}, last)
    with pytest.raises(CheckpointError, match="not an nlstm checkpoint"):
        train(run_config(epochs=1), tmp_path, prepared=stream, resume=True, **QUIET)
    ck = load_checkpoint(tmp_path / BEST)  # an export-only checkpoint: no training position
    ck.extra = {}
    save_checkpoint(ck, last)
    with pytest.raises(CheckpointError, match="holds no training position"):
        train(run_config(epochs=1), tmp_path, prepared=stream, resume=True, **QUIET)


def test_carry_state_changes_training(tmp_path, stream, uninterrupted):
    train(run_config(epochs=1, carry_state=False), tmp_path / "b", prepared=stream, **QUIET)
    assert not same_weights(weights_of(uninterrupted[1]), weights_of(tmp_path / "b"))
    assert load_checkpoint(tmp_path / "b" / LAST).extra["trainer"]["carry"] is None


# ------------------------------------------------------------------------------- init_from
def test_init_from_starts_a_fresh_run_from_another_runs_weights(tmp_path, stream, uninterrupted):
    a = uninterrupted[1]
    start = load_checkpoint(a / BEST)
    # a learning rate of 1e-9 leaves the starting weights as they are (to 1e-6)
    cfg = run_config(epochs=1, init_from=str(a / BEST), optimizer={"lr": 1e-9})
    train(cfg, tmp_path / "b", prepared=stream, **QUIET)
    b = load_checkpoint(tmp_path / "b" / LAST)
    assert b.train_config["init_from"] == str(a / BEST)
    assert b.step == start.step  # a fresh run: steps, epochs and optimizer counted from 0
    for k, v in start.model.items():
        assert torch.allclose(b.model[k], v, atol=1e-6), k
    _, evals_a = read_metrics(a)
    _, evals_b = read_metrics(tmp_path / "b")
    assert evals_b[0]["valid_bpc"] == pytest.approx(evals_a[-1]["best_valid_bpc"], abs=1e-4)
    # the same config without init_from starts from the paper's initialisation instead
    train(replace(cfg, init_from=""), tmp_path / "c", prepared=stream, **QUIET)
    _, evals_c = read_metrics(tmp_path / "c")
    assert evals_c[0]["valid_bpc"] > evals_b[0]["valid_bpc"] + 0.5


def test_init_from_refuses_a_checkpoint_that_does_not_fit(tmp_path, stream, uninterrupted):
    best = uninterrupted[1] / BEST
    with pytest.raises(ConfigError, match=r"init_from=.*its model differs in hidden_size"):
        train(
            run_config(model={"hidden_size": 8}, init_from=str(best)),
            tmp_path / "b",
            prepared=stream,
            **QUIET,
        )
    ck = load_checkpoint(best)
    ck.tokenizer = b"another tokenizer"
    save_checkpoint(ck, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="its tokenizer differs"):
        train(
            run_config(init_from=str(tmp_path / "other.pt")),
            tmp_path / "c",
            prepared=stream,
            **QUIET,
        )
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train(
            run_config(init_from=str(tmp_path / "missing.pt")),
            tmp_path / "d",
            prepared=stream,
            **QUIET,
        )
    # nothing was written for a run that could not start
    assert not (tmp_path / "b" / METRICS).exists() and not (tmp_path / "c" / METRICS).exists()
