"""The trainer on small synthetic data: metrics, checkpoints, run options, the lr schedule.

Runs use training/testing/data.py's tiny datasets (a character stream, padded sequences, glimpse
sequences) in place of training.data.load, and models of 8-16 cells: each run takes a second or
two of CPU time on one torch thread (tests/conftest.py; 1.0-1.7 s for one or two epochs of the
stream, measured), more wall time when other jobs share the cores. Resuming and starting from
another run are tests/test_trainer_resume.py; the config, tests/test_train_config.py.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import pytest
import torch
from trainer_runs import QUIET, Kill, kill_at, prepared_stream, run_config, same_weights, weights_of

from training.checkpoint import load_checkpoint
from training.config import ConfigError
from training.testing.data import glimpses_prepared, sequences_prepared
from training.trainer import BEST, LAST, METRICS, figures, read_metrics, train


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return prepared_stream(tmp_path_factory.mktemp("stream"))


# ---------------------------------------------------------------------------------- metrics
def test_stream_run_writes_metrics_and_checkpoints(tmp_path, stream):
    summary = train(run_config(), tmp_path, prepared=stream, **QUIET)
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
    assert ck.train_config == run_config().to_dict() and ck.step == evals[-1]["step"]
    assert ck.optimizer is not None and set(ck.rng) >= {"torch", "numpy", "python"}
    assert ck.extra["trainer"]["position"] == {"epoch": 2, "batch": 0}
    assert ck.extra["hardware"] == run["hardware"]  # an export's meta.json says what it trained on
    best_ck = load_checkpoint(tmp_path / BEST)
    assert best_ck.optimizer is None and best_ck.step == best["step"]
    assert best_ck.build_model() is not None


def test_eval_covers_every_character_once(tmp_path, stream):
    from training.trainer import Trainer

    t = Trainer(run_config(), tmp_path, stream, **QUIET)
    n = sum(int(b.mask.sum()) for b in t.data.eval_batches("valid"))
    assert n == len(stream.splits["valid"].ids) - 1


def test_sequences_report_perplexity(tmp_path):
    prepared = sequences_prepared(tmp_path / "data")
    cfg = run_config(task="poems", batch_size=16, model={"hidden_size": 16}, optimizer={"lr": 0.01})
    train(cfg, tmp_path / "run", prepared=prepared, **QUIET)
    _, evals = read_metrics(tmp_path / "run")
    for e in evals:
        assert {"train_ppl", "valid_ppl", "test_ppl", "best_valid_ppl", "best_test_ppl"} <= set(e)
        assert 1 < e["valid_ppl"] < prepared.vocab_size
    assert evals[-1]["valid_ppl"] < evals[0]["valid_ppl"]


def test_glimpses_report_nll_and_accuracy(tmp_path):
    prepared = glimpses_prepared(tmp_path)
    cfg = run_config(
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
        run_config(epochs=1, eval_every=20),
        tmp_path,
        prepared=stream,
        log=lambda *_: None,
        progress=True,
    )
    _, evals = read_metrics(tmp_path)
    n = evals[-1]["step"]
    assert [e["step"] for e in evals] == [*range(20, n, 20), n]
    assert 0 < evals[0]["epoch"] < 1 and evals[-1]["epoch"] == 1
    out = err.getvalue()
    assert "bpc=" in out and "chars/s" in out and "epoch 1/1" in out


def test_quiet_when_not_a_terminal(tmp_path, stream, capsys):
    train(run_config(epochs=1, max_steps=3), tmp_path, prepared=stream)  # progress=None: auto
    captured = capsys.readouterr()
    assert "chars/s" not in captured.err  # pytest's stderr is not a terminal
    assert "step 3" in captured.out  # one line per evaluation on stdout


# ------------------------------------------------------------------------------ run options
def test_bf16_autocast_trains(tmp_path, stream):
    train(run_config(epochs=1, bf16=True), tmp_path, prepared=stream, **QUIET)
    _, evals = read_metrics(tmp_path)
    assert math.isfinite(evals[-1]["valid_bpc"]) and evals[-1]["valid_bpc"] < 6


@pytest.mark.gpu
def test_cuda_run_resumes_close_to_an_uninterrupted_one_and_trains_in_bf16(tmp_path, stream):
    # CUDA kernels (atomics in the embedding and matmul backward) are not bit-reproducible, so
    # the resumed run is held to allclose instead of the CPU's equality.
    cfg = run_config(device="cuda", epochs=1, max_steps=30, checkpoint_every=10)
    train(cfg, tmp_path / "a", prepared=stream, **QUIET)
    with pytest.raises(Kill):
        train(cfg, tmp_path / "b", prepared=stream, on_step=kill_at(17), **QUIET)
    ck = load_checkpoint(tmp_path / "b" / LAST)
    assert ck.step == 10 and "cuda" in ck.rng
    train(cfg, tmp_path / "b", prepared=stream, resume=True, **QUIET)
    a, b = weights_of(tmp_path / "a"), weights_of(tmp_path / "b")
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

    t = Trainer(run_config(max_train_items=1001, max_eval_items=401), tmp_path, stream, **QUIET)
    assert len(t.data.train.ids) == 1001 and len(t.data.eval["test"].ids) == 401
    assert t.n_batches == 10  # rows of 250 targets, 25 per batch


def test_seed_decides_the_weights(tmp_path, stream):
    train(run_config(epochs=1, max_steps=3), tmp_path / "a", prepared=stream, **QUIET)
    train(run_config(epochs=1, max_steps=3, seed=4), tmp_path / "b", prepared=stream, **QUIET)
    assert not same_weights(weights_of(tmp_path / "a"), weights_of(tmp_path / "b"))


def test_device_and_batch_checks(tmp_path, stream):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            train(run_config(device="cuda"), tmp_path, prepared=stream, **QUIET)
    with pytest.raises(ConfigError, match="task 'text8' but the data given is 'ptb'"):
        train(run_config(task="text8"), tmp_path, prepared=stream, **QUIET)


# ---------------------------------------------------------------------------- lr schedule
def test_linear_schedule_runs_from_lr_to_lr_final_and_resumes_exactly(tmp_path, stream):
    opt = {"lr": 0.01, "schedule": "linear", "lr_final": 0.001}
    cfg = run_config(optimizer=opt, checkpoint_every=7)
    train(cfg, tmp_path / "a", prepared=stream, **QUIET)
    run, evals = read_metrics(tmp_path / "a")
    n = run["train_batches_per_epoch"]
    # the lr of the last update before each evaluation: steps n-1 and 2n-1 of 0..2n-1
    assert evals[0]["lr"] == pytest.approx(0.01 + (0.001 - 0.01) * (n - 1) / (2 * n - 1))
    assert evals[1]["lr"] == pytest.approx(0.001)
    # a function of the step: a run stopped and resumed follows it exactly
    train(replace(cfg, max_steps=n + 3), tmp_path / "b", prepared=stream, **QUIET)
    train(cfg, tmp_path / "b", prepared=stream, resume=True, **QUIET)
    assert same_weights(weights_of(tmp_path / "a"), weights_of(tmp_path / "b"))
    # and it trains differently from the constant rate
    train(run_config(optimizer={"lr": 0.01}), tmp_path / "c", prepared=stream, **QUIET)
    assert not same_weights(weights_of(tmp_path / "a"), weights_of(tmp_path / "c"))
    _, evals_c = read_metrics(tmp_path / "c")
    assert [e["lr"] for e in evals_c] == [0.01, 0.01]
