"""The trainer on small synthetic data: metrics, checkpoints, exact resume, config overrides.

Runs use training/testing/data.py's tiny datasets (a character stream, padded sequences, glimpse
sequences) in place of training.data.load, and models of 8-16 cells: each run takes a second or
two of CPU time on one torch thread (tests/conftest.py; 1.0-1.7 s for one or two epochs of the
stream, measured), more wall time when other jobs share the cores. The uninterrupted runs that
resumed ones must equal are trained once per module (the `uninterrupted` fixture).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.config import (
    ConfigError,
    TrainConfig,
    allowed_keys,
    apply_overrides,
    load_config,
    model_config_for,
)
from training.testing.data import glimpses_prepared, sequences_prepared, stream_prepared
from training.trainer import BEST, LAST, METRICS, figures, read_metrics, train

QUIET = dict(log=lambda *_: None, progress=False)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return stream_prepared(tmp_path_factory.mktemp("stream"), n_train=6000, n_eval=800)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, stream):
    """Uninterrupted runs of _cfg() for 1 and 2 epochs, trained once for the module: what the
    resumed, killed and extended runs below must end equal to. Tests read them, never write
    them (checkpoint_every changes neither the weights nor the evaluations: saving draws no
    random numbers)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    for epochs in (1, 2):
        train(_cfg(epochs=epochs), root / f"epochs{epochs}", prepared=stream, **QUIET)
    return {1: root / "epochs1", 2: root / "epochs2"}


def _cfg(**kw) -> TrainConfig:
    base = dict(
        task="ptb",
        model={"hidden_size": 12},
        batch_size=4,
        seq_len=25,
        epochs=2,
        checkpoint_every=0,
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / LAST).model


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _figures_only(evals):
    drop = ("train_items_per_s", "elapsed_s")
    return [{k: v for k, v in e.items() if k not in drop} for e in evals]


class Kill(Exception):
    """Stands for a SIGKILL at an arbitrary point: nothing after it runs."""


def _kill_at(step):
    def hook(s):
        if s == step:
            raise Kill

    return hook


# ---------------------------------------------------------------------------------- metrics
def test_stream_run_writes_metrics_and_checkpoints(tmp_path, stream):
    summary = train(_cfg(), tmp_path, prepared=stream, **QUIET)
    assert {p.name for p in tmp_path.iterdir()} == {METRICS, LAST, BEST}
    lines = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    run, evals = lines[0], lines[1:]
    assert run["type"] == "run" and run["seed"] == 3 and run["task"] == "ptb"
    assert run["config"]["optimizer"]["lr"] == 0.002
    assert run["config"]["model"] == {"hidden_size": 12}
    assert set(run["versions"]) >= {"torch", "python", "nlstm", "numpy"}
    assert (
        run["hardware"]["device"] == "cpu"
        and run["hardware"]["name"]
        and run["hardware"]["processes"] == 1
    )
    assert run["params"] > 0 and run["world_size"] == 1 and run["device"] == "cpu"
    steps_per_epoch = run["train_batches_per_epoch"]
    assert [e["epoch"] for e in evals] == [1, 2]
    assert [e["step"] for e in evals] == [steps_per_epoch, 2 * steps_per_epoch]
    for e in evals:
        assert e["type"] == "eval"
        for k in ("train_bpc", "valid_bpc", "test_bpc", "best_valid_bpc", "best_test_bpc"):
            assert 0 < e[k] < 8, k
    # the reported test figure is the one at the evaluation of best validation
    best = min(evals, key=lambda e: e["valid_bpc"])
    assert evals[-1]["best_valid_bpc"] == best["valid_bpc"]
    assert evals[-1]["best_test_bpc"] == best["test_bpc"]
    assert evals[-1]["best_epoch"] == best["epoch"] and evals[-1]["best_step"] == best["step"]
    assert summary["best"]["bpc"]["test"] == best["test_bpc"]
    # it learned something: the grammar's text is far from uniform over ~20 symbols
    assert evals[-1]["valid_bpc"] < evals[0]["valid_bpc"] < math.log2(stream.vocab_size)
    ck = load_checkpoint(tmp_path / LAST)
    assert ck.tokenizer == stream.tokenizer_path.read_bytes()
    assert ck.train_config == _cfg().to_dict() and ck.step == evals[-1]["step"]
    assert ck.optimizer is not None and set(ck.rng) >= {"torch", "numpy", "python"}
    assert ck.extra["trainer"]["position"] == {"epoch": 2, "batch": 0}
    assert ck.extra["hardware"] == run["hardware"]  # an export's meta.json says what it trained on
    best_ck = load_checkpoint(tmp_path / BEST)
    assert best_ck.optimizer is None and best_ck.step == best["step"]
    assert best_ck.build_model() is not None


def test_eval_covers_every_character_once(tmp_path, stream):
    from training.trainer import Trainer

    t = Trainer(_cfg(), tmp_path, stream, **QUIET)
    n = sum(int(b.mask.sum()) for b in t.data.eval_batches("valid"))
    assert n == len(stream.splits["valid"].ids) - 1


def test_sequences_report_perplexity(tmp_path):
    prepared = sequences_prepared(tmp_path / "data")
    cfg = _cfg(task="poems", batch_size=16, model={"hidden_size": 16}, optimizer={"lr": 0.01})
    train(cfg, tmp_path / "run", prepared=prepared, **QUIET)
    _, evals = read_metrics(tmp_path / "run")
    for e in evals:
        assert {"train_ppl", "valid_ppl", "test_ppl", "best_valid_ppl", "best_test_ppl"} <= set(e)
        assert 1 < e["valid_ppl"] < prepared.vocab_size
    assert evals[-1]["valid_ppl"] < evals[0]["valid_ppl"]


def test_glimpses_report_nll_and_accuracy(tmp_path):
    prepared = glimpses_prepared(tmp_path)
    cfg = _cfg(
        task="mnist",
        batch_size=32,
        epochs=3,
        model={"core": "lstm", "hidden_size": 16},
        optimizer={"name": "rmsprop", "lr": 0.01, "alpha": 0.9},
    )
    train(cfg, tmp_path / "run", prepared=prepared, **QUIET)
    run, evals = read_metrics(tmp_path / "run")
    assert run["model_config"]["kind"] == "glimpse"
    for e in evals:
        for k in (
            "valid_nll",
            "valid_acc",
            "test_nll",
            "test_acc",
            "train_nll",
            "train_acc",
            "best_valid_nll",
            "best_test_nll",
            "best_valid_acc",
            "best_test_acc",
        ):
            assert k in e
        assert 0 <= e["valid_acc"] <= 1
    assert evals[-1]["best_valid_acc"] > 0.3  # the label is a lit pixel: learnable (chance: 0.1)
    assert evals[-1]["best_valid_acc"] == max(e["valid_acc"] for e in evals)


def test_figures():
    assert figures("stream", 2 * math.log(2), 2, 0) == {"bpc": 1.0}
    assert figures("sequences", 4.0, 2, 0) == {"ppl": pytest.approx(math.e**2)}
    assert figures("glimpses", 1.0, 4, 3) == {"nll": 0.25, "acc": 0.75}


def test_eval_every_and_progress_bar(tmp_path, stream, monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    train(
        _cfg(epochs=1, eval_every=20), tmp_path, prepared=stream, log=lambda *_: None, progress=True
    )
    _, evals = read_metrics(tmp_path)
    n = evals[-1]["step"]
    assert [e["step"] for e in evals] == [*range(20, n, 20), n]
    assert 0 < evals[0]["epoch"] < 1 and evals[-1]["epoch"] == 1
    out = err.getvalue()
    assert "bpc=" in out and "chars/s" in out and "epoch 1/1" in out


def test_quiet_when_not_a_terminal(tmp_path, stream, capsys):
    train(_cfg(epochs=1, max_steps=3), tmp_path, prepared=stream)  # progress=None: auto
    captured = capsys.readouterr()
    assert "chars/s" not in captured.err  # pytest's stderr is not a terminal
    assert "step 3" in captured.out  # one line per evaluation on stdout


# --------------------------------------------------------------------------------- resuming
def test_resume_after_max_steps_is_bit_identical(tmp_path, stream, uninterrupted):
    cfg = _cfg(checkpoint_every=7)
    a = uninterrupted[2]
    s = train(replace(cfg, max_steps=45), tmp_path / "b", prepared=stream, **QUIET)
    assert s["stopped"] == "max_steps" and s["step"] == 45
    s = train(cfg, tmp_path / "b", prepared=stream, resume=True, **QUIET)
    assert s["stopped"] == "done"
    assert _same(_weights(a), _weights(tmp_path / "b"))
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
        prepared, cfg = stream, _cfg(checkpoint_every=10)
        a = uninterrupted[2]
    else:
        prepared = glimpses_prepared(tmp_path)
        cfg = _cfg(
            task="mnist",
            batch_size=24,
            epochs=3,
            checkpoint_every=4,
            optimizer={"name": "rmsprop", "lr": 0.003},
        )
        a = tmp_path / "a"
        train(cfg, a, prepared=prepared, **QUIET)
    with pytest.raises(Kill):  # killed after step 23's update, before it was saved
        train(cfg, tmp_path / "b", prepared=prepared, on_step=_kill_at(23), **QUIET)
    saved = load_checkpoint(tmp_path / "b" / LAST).step
    assert saved < 23  # the resumed run must redo some steps
    train(cfg, tmp_path / "b", prepared=prepared, resume=True, **QUIET)
    assert _same(_weights(a), _weights(tmp_path / "b"))
    _, ea = read_metrics(a)
    _, eb = read_metrics(tmp_path / "b")
    assert _figures_only(ea) == _figures_only(eb)  # no duplicated or lost evaluations


def test_killed_between_evaluation_and_checkpoint(tmp_path, stream, uninterrupted, monkeypatch):
    """A metrics line was written, its checkpoint was not: resume drops the line, redoes it."""
    cfg = _cfg()
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
    assert _same(_weights(uninterrupted[2]), _weights(tmp_path / "b"))
    lines = (tmp_path / "b" / METRICS).read_text().splitlines()
    types = [json.loads(x)["type"] for x in lines]
    assert types == ["run", "eval", "resume", "eval"]


def test_a_kill_while_writing_leaves_the_previous_checkpoint(
    tmp_path, stream, uninterrupted, monkeypatch
):
    cfg = _cfg(checkpoint_every=10)
    run = tmp_path / "b"
    with pytest.raises(Kill):
        train(cfg, run, prepared=stream, on_step=_kill_at(15), **QUIET)
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
    assert _same(_weights(uninterrupted[2]), _weights(run))


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
    cfg = _cfg(epochs=1, checkpoint_every=3)
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
    assert _same(_weights(tmp_path / "a"), _weights(run))


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path, stream, uninterrupted):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / METRICS).write_text('{"type": "run"}\n')  # killed before any checkpoint
    train(_cfg(epochs=1), tmp_path / "b", prepared=stream, resume=True, **QUIET)
    assert _same(_weights(uninterrupted[1]), _weights(tmp_path / "b"))
    assert [json.loads(x)["type"] for x in (tmp_path / "b" / METRICS).read_text().splitlines()] == [
        "run",
        "eval",
    ]


def test_a_finished_run_resumes_to_nothing_and_can_be_extended(tmp_path, stream, uninterrupted):
    shutil.copytree(uninterrupted[1], tmp_path / "a")  # a finished one-epoch run
    s = train(_cfg(epochs=1), tmp_path / "a", prepared=stream, resume=True, **QUIET)
    assert s["stopped"] == "done" and s["epoch"] == 1
    train(_cfg(epochs=2), tmp_path / "a", prepared=stream, resume=True, **QUIET)  # epochs may grow
    assert _same(_weights(tmp_path / "a"), _weights(uninterrupted[2]))


def test_resume_refuses_another_config(tmp_path, stream):
    train(_cfg(epochs=1, max_steps=5), tmp_path, prepared=stream, **QUIET)
    with pytest.raises(ConfigError, match=r"optimizer\.lr: 0\.002 -> 0\.001.*may change on resume"):
        train(_cfg(optimizer={"lr": 0.001}), tmp_path, prepared=stream, resume=True, **QUIET)


def test_an_existing_run_needs_resume(tmp_path, stream):
    train(_cfg(epochs=1, max_steps=2), tmp_path, prepared=stream, **QUIET)
    with pytest.raises(ValueError, match=r"already holds a run.*--resume"):
        train(_cfg(epochs=1), tmp_path, prepared=stream, **QUIET)


def test_corrupt_or_foreign_last_checkpoint(tmp_path, stream):
    train(_cfg(epochs=1, max_steps=2), tmp_path, prepared=stream, **QUIET)
    last = tmp_path / LAST
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="not a readable nlstm checkpoint"):
        train(_cfg(epochs=1), tmp_path, prepared=stream, resume=True, **QUIET)
    torch.save({"model": {}}, last)
    with pytest.raises(CheckpointError, match="not an nlstm checkpoint"):
        train(_cfg(epochs=1), tmp_path, prepared=stream, resume=True, **QUIET)
    ck = load_checkpoint(tmp_path / BEST)  # an export-only checkpoint: no training position
    ck.extra = {}
    save_checkpoint(ck, last)
    with pytest.raises(CheckpointError, match="holds no training position"):
        train(_cfg(epochs=1), tmp_path, prepared=stream, resume=True, **QUIET)


# ------------------------------------------------------------------------------ run options
def test_carry_state_changes_training(tmp_path, stream, uninterrupted):
    train(_cfg(epochs=1, carry_state=False), tmp_path / "b", prepared=stream, **QUIET)
    assert not _same(_weights(uninterrupted[1]), _weights(tmp_path / "b"))
    assert load_checkpoint(tmp_path / "b" / LAST).extra["trainer"]["carry"] is None


def test_bf16_autocast_trains(tmp_path, stream):
    train(_cfg(epochs=1, bf16=True), tmp_path, prepared=stream, **QUIET)
    _, evals = read_metrics(tmp_path)
    assert math.isfinite(evals[-1]["valid_bpc"]) and evals[-1]["valid_bpc"] < 6


@pytest.mark.gpu
def test_cuda_run_resumes_close_to_an_uninterrupted_one_and_trains_in_bf16(tmp_path, stream):
    # CUDA kernels (atomics in the embedding and matmul backward) are not bit-reproducible, so
    # the resumed run is held to allclose instead of the CPU's equality.
    cfg = _cfg(device="cuda", epochs=1, max_steps=30, checkpoint_every=10)
    train(cfg, tmp_path / "a", prepared=stream, **QUIET)
    with pytest.raises(Kill):
        train(cfg, tmp_path / "b", prepared=stream, on_step=_kill_at(17), **QUIET)
    ck = load_checkpoint(tmp_path / "b" / LAST)
    assert ck.step == 10 and "cuda" in ck.rng
    train(cfg, tmp_path / "b", prepared=stream, resume=True, **QUIET)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    run, ea = read_metrics(tmp_path / "a")
    _, eb = read_metrics(tmp_path / "b")
    assert run["device"].startswith("cuda")
    assert [e["step"] for e in ea] == [e["step"] for e in eb]
    assert eb[-1]["valid_bpc"] == pytest.approx(ea[-1]["valid_bpc"], rel=1e-4)

    train(replace(cfg, bf16=True, max_steps=20), tmp_path / "bf16", prepared=stream, **QUIET)
    run, evals = read_metrics(tmp_path / "bf16")
    assert run["config"]["bf16"] is True and run["device"].startswith("cuda")
    assert math.isfinite(evals[-1]["valid_bpc"]) and evals[-1]["valid_bpc"] < 6


def test_data_limits(tmp_path, stream):
    from training.trainer import Trainer

    t = Trainer(_cfg(max_train_items=1001, max_eval_items=401), tmp_path, stream, **QUIET)
    assert len(t.data.train.ids) == 1001 and len(t.data.eval["test"].ids) == 401
    assert t.n_batches == 10  # rows of 250 targets, 25 per batch


def test_seed_decides_the_weights(tmp_path, stream):
    train(_cfg(epochs=1, max_steps=3), tmp_path / "a", prepared=stream, **QUIET)
    train(_cfg(epochs=1, max_steps=3, seed=4), tmp_path / "b", prepared=stream, **QUIET)
    assert not _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


def test_device_and_batch_checks(tmp_path, stream):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            train(_cfg(device="cuda"), tmp_path, prepared=stream, **QUIET)
    with pytest.raises(ConfigError, match="task 'text8' but the data given is 'ptb'"):
        train(_cfg(task="text8"), tmp_path, prepared=stream, **QUIET)


# ---------------------------------------------------------------------------------- config
def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'task = "ptb"\nepochs = 3\nclip = 1\n[model]\ncore = "nlstm"\nhidden_size = 600\n'
        '[optimizer]\nname = "adam"\nlr = 0.002\n'
    )
    c = load_config(
        path,
        [
            "model.hidden_size=128",
            "optimizer.lr=1e-3",
            "bf16=true",
            "carry_state=no",
            "epochs=5",
            "data_dir=/x",
        ],
    )
    assert c.model == {"core": "nlstm", "hidden_size": 128}
    assert c.optimizer.lr == 0.001 and c.bf16 is True and c.carry_state is False
    assert c.epochs == 5 and c.clip == 1.0 and isinstance(c.clip, float) and c.data_dir == "/x"
    assert TrainConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "optimizer.lrr=1",
            r"unknown config key 'optimizer.lrr' \(did you mean optimizer.lr\?\); "
            r"allowed: .*optimizer.lr",
        ),
        (
            "hidden_size=64",
            r"unknown config key 'hidden_size' \(did you mean model.hidden_size\?\)",
        ),
        ("model.hiden_size=64", r"'model.hiden_size' \(did you mean model.hidden_size\?\)"),
        ("model.cells=3", "unknown config key 'model.cells'; allowed: .*model.hidden_size"),
        (
            "epoch=3",
            r"unknown config key 'epoch' \(did you mean epochs\?\); allowed: task, .*epochs",
        ),
        ("epochs.x=3", "unknown config key 'epochs.x'"),
        ("epochs=two", "epochs must be an integer, got 'two'"),
        ("optimizer.lr=fast", "optimizer.lr must be a number"),
        ("bf16=maybe", "bf16 must be true or false"),
        ("model.hidden_size=1.5", "model.hidden_size must be an integer"),
        ("epochs", "is not key=value"),
        ("optimizer.name=sgd", "optimizer.name must be one of \\('adam', 'rmsprop'\\)"),
        ("optimizer.lr=0", "optimizer.lr must be > 0"),
        ("batch_size=0", "batch_size must be >= 1"),
        ("clip=-1", "clip must be >= 0"),
        ("device=tpu", "device must be auto, cpu, cuda or cuda:N"),
        ("task=wiki", "task must be one of ptb, text8, poems, mnist"),
    ],
)
def test_bad_overrides_say_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    bad.write_text('epochs = "3"\n')
    with pytest.raises(
        ConfigError, match=re.escape("bad.toml: epochs must be an integer, got '3'")
    ):
        load_config(bad)
    bad.write_text("[model]\nwidth = 3\n")
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'model.width'")):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_the_data_completes_the_model_config():
    c = TrainConfig(task="ptb", model={"hidden_size": 8})
    mc = model_config_for(c, 51, None, "stream")
    assert mc.kind == "char" and mc.vocab_size == 51 and mc.hidden_size == 8
    mc = model_config_for(TrainConfig(task="mnist"), 0, 10, "glimpses")
    assert mc.kind == "glimpse" and mc.num_classes == 10
    with pytest.raises(
        ConfigError, match=re.escape("model.vocab_size = 50 disagrees with the ptb data")
    ):
        model_config_for(TrainConfig(task="ptb", model={"vocab_size": 50}), 51, None, "stream")


def test_allowed_keys_and_overrides_on_dicts():
    keys = allowed_keys()
    assert "model.hidden_size" in keys and "optimizer.alpha" in keys and "max_steps" in keys
    d = apply_overrides({"model": {"core": "lstm"}}, ["model.num_layers=2", "seed=7"])
    assert d == {"model": {"core": "lstm", "num_layers": 2}, "seed": 7}


# ------------------------------------------------------------------------------- init_from
def test_init_from_starts_a_fresh_run_from_another_runs_weights(tmp_path, stream, uninterrupted):
    a = uninterrupted[1]
    start = load_checkpoint(a / BEST)
    # a learning rate of 1e-9 leaves the starting weights as they are (to 1e-6)
    cfg = _cfg(epochs=1, init_from=str(a / BEST), optimizer={"lr": 1e-9})
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
            _cfg(model={"hidden_size": 8}, init_from=str(best)),
            tmp_path / "b",
            prepared=stream,
            **QUIET,
        )
    ck = load_checkpoint(best)
    ck.tokenizer = b"another tokenizer"
    save_checkpoint(ck, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="its tokenizer differs"):
        train(_cfg(init_from=str(tmp_path / "other.pt")), tmp_path / "c", prepared=stream, **QUIET)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train(
            _cfg(init_from=str(tmp_path / "missing.pt")), tmp_path / "d", prepared=stream, **QUIET
        )
    # nothing was written for a run that could not start
    assert not (tmp_path / "b" / METRICS).exists() and not (tmp_path / "c" / METRICS).exists()


# ---------------------------------------------------------------------------- lr schedule
def test_linear_schedule_runs_from_lr_to_lr_final_and_resumes_exactly(tmp_path, stream):
    opt = {"lr": 0.01, "schedule": "linear", "lr_final": 0.001}
    cfg = _cfg(optimizer=opt, checkpoint_every=7)
    train(cfg, tmp_path / "a", prepared=stream, **QUIET)
    run, evals = read_metrics(tmp_path / "a")
    n = run["train_batches_per_epoch"]
    # the lr of the last update before each evaluation: steps n-1 and 2n-1 of 0..2n-1
    assert evals[0]["lr"] == pytest.approx(0.01 + (0.001 - 0.01) * (n - 1) / (2 * n - 1))
    assert evals[1]["lr"] == pytest.approx(0.001)
    # a function of the step: a run stopped and resumed follows it exactly
    train(replace(cfg, max_steps=n + 3), tmp_path / "b", prepared=stream, **QUIET)
    train(cfg, tmp_path / "b", prepared=stream, resume=True, **QUIET)
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    # and it trains differently from the constant rate
    train(_cfg(optimizer={"lr": 0.01}), tmp_path / "c", prepared=stream, **QUIET)
    assert not _same(_weights(tmp_path / "a"), _weights(tmp_path / "c"))
    _, evals_c = read_metrics(tmp_path / "c")
    assert [e["lr"] for e in evals_c] == [0.01, 0.01]


def test_schedule_settings_are_checked():
    with pytest.raises(
        ConfigError, match=r"optimizer.schedule must be one of \('constant', 'linear'\)"
    ):
        TrainConfig(task="ptb", optimizer={"schedule": "cosine"})
    with pytest.raises(
        ConfigError, match=r"optimizer.lr_final must be in \[0, optimizer.lr = 0.002\]"
    ):
        TrainConfig(task="ptb", optimizer={"schedule": "linear", "lr_final": 0.01})
