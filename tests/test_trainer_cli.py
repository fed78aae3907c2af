"""`nlstm train`, `nlstm export`, `nlstm plot` and `nlstm visualize` through the command's `main`:
the runs, the figures, and what each says when it is used wrongly or interrupted."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from training.checkpoint import load_checkpoint
from training.cli import build_parser, main
from training.config import TrainConfig
from training.plots import cell_activations, plot_runs, visualize_checkpoint
from training.testing.data import glimpses_prepared, stream_prepared
from training.trainer import BEST, LAST, read_metrics, train

REPO = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *_: None, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short character runs (NLSTM and a 2-layer LSTM) and one glimpse run."""
    root = tmp_path_factory.mktemp("runs")
    prepared = stream_prepared(root / "data", n_train=5000, n_eval=600)
    base = dict(task="ptb", batch_size=4, seq_len=25, epochs=2, checkpoint_every=0)
    train(
        TrainConfig(model={"hidden_size": 12}, **base), root / "nlstm", prepared=prepared, **QUIET
    )
    train(
        TrainConfig(model={"core": "lstm", "num_layers": 2, "hidden_size": 10}, **base),
        root / "lstm",
        prepared=prepared,
        **QUIET,
    )
    train(
        TrainConfig(task="mnist", model={"hidden_size": 8}, batch_size=64, epochs=2),
        root / "mnist",
        prepared=glimpses_prepared(root),
        **QUIET,
    )
    return root


# ------------------------------------------------------------------------------------- train
def test_train_parses_options_and_overrides_in_any_order():
    p = build_parser()
    a = p.parse_args(["train", "c.toml", "--run-dir", "d", "epochs=2", "model.depth=3", "--resume"])
    assert (a.config, a.run_dir, a.resume, a.overrides) == (
        Path("c.toml"),
        Path("d"),
        True,
        ["epochs=2", "model.depth=3"],
    )
    a = p.parse_args(["train", "--max-steps", "7", "c.toml", "seed=1", "--run-dir", "d"])
    assert a.max_steps == 7 and a.overrides == ["seed=1"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["optimizer.lrr=1"],
            "unknown config key 'optimizer.lrr' (did you mean optimizer.lr?); allowed:",
        ),
        (["hidden_size=64"], "unknown config key 'hidden_size' (did you mean model.hidden_size?)"),
        (["epochs=two"], "epochs must be an integer"),
        (["model.core=gru"], "model core must be one of"),
    ],
)
def test_train_errors_are_one_line(tmp_path, capsys, args, message):
    rc = main(
        [
            "train",
            str(REPO / "configs" / "smoke.toml"),
            "--run-dir",
            str(tmp_path / "r"),
            f"cache_dir={tmp_path}",
            f"data_dir={tmp_path}",
            *args,
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("nlstm train: error: ") and message in err and "Traceback" not in err


def test_train_and_resume_on_real_ptb(shared_data, tmp_path, capsys):
    run = tmp_path / "run"
    common = [
        "--run-dir",
        str(run),
        "--progress",
        "off",
        f"data_dir={shared_data}",
        f"cache_dir={tmp_path / 'cache'}",
        "model.hidden_size=16",
        "max_train_items=20000",
        "max_eval_items=3000",
        "epochs=1",
    ]
    assert (
        main(["train", str(REPO / "configs" / "ptb-nlstm-2x600.toml"), "--max-steps", "2", *common])
        == 0
    )
    assert "reached max_steps at step 2 after " in capsys.readouterr().out
    assert main(["train", str(REPO / "configs" / "ptb-nlstm-2x600.toml"), *common]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", str(REPO / "configs" / "ptb-nlstm-2x600.toml"), "--resume", *common]) == 0
    header, evals = read_metrics(run)
    assert header["model_config"]["vocab_size"] == 51  # the PTB tokenizer's ids
    assert [e["step"] for e in evals] == [2, header["train_batches_per_epoch"]]
    ck = load_checkpoint(run / LAST)
    assert ck.tokenizer and ck.task == "ptb" and ck.train_config["max_steps"] == 0


def test_a_flag_where_an_override_is_meant_gets_trains_usage_and_the_override(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "configs/smoke.toml", "--run-dir", "r", "--epochs", "1", "--hidden-size=64"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: nlstm train ")  # train's usage, not the top-level one
    assert "unrecognized arguments: --epochs --hidden-size=64" in err
    assert (
        "overrides written key=value" in err
        and "did you mean epochs=1 model.hidden_size=64?" in err
    )
    with pytest.raises(SystemExit):
        main(["train", "configs/smoke.toml", "--run-dir", "r", "--frobnicate"])
    err = capsys.readouterr().err
    assert err.startswith("usage: nlstm train ") and err.rstrip().endswith(
        "unrecognized arguments: --frobnicate"
    )


def _cli_in_subprocess(args: list[str], cwd: Path) -> tuple[int, str, bool]:
    """(exit status, stderr, whether torch was imported) of `nlstm ARGS` in a fresh interpreter."""
    code = (
        "import sys; from training.cli import main; rc = main(sys.argv[1:]); "
        "print('torch' in sys.modules); sys.exit(rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
        timeout=120,
    )
    return out.returncode, out.stderr, out.stdout.strip().splitlines()[-1] == "True"


def test_config_errors_and_a_taken_run_dir_are_reported_before_torch_loads(tmp_path):
    smoke = str(REPO / "configs" / "smoke.toml")
    rc, err, torch_loaded = _cli_in_subprocess(
        ["train", smoke, "--run-dir", str(tmp_path / "r"), "optimizer.lrr=0.01"], tmp_path
    )
    assert (rc, torch_loaded) == (2, False) and "did you mean optimizer.lr?" in err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text("{}\n")
    rc, err, torch_loaded = _cli_in_subprocess(
        ["train", smoke, "--run-dir", str(tmp_path / "r")], tmp_path
    )
    assert (rc, torch_loaded) == (
        2,
        False,
    ) and "already holds a run (metrics.jsonl); pass --resume" in err


@pytest.fixture
def sigint_raises():
    """Python's own SIGINT handler, as in a terminal. A test process started in the background
    (`nohup pytest ... &`) inherits SIGINT ignored, and a Ctrl-C would then do nothing at all."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_says_what_was_saved_and_how_to_resume(tmp_path, monkeypatch, capsys, sigint_raises):
    """A real SIGINT in the middle of a run (the CLI's own data loading replaced by a small
    synthetic stream): exit 130, what last.pt holds, the command that continues; that command
    finishes the run, and resuming the finished run adds nothing to metrics.jsonl."""
    import signal

    from training import data as data_mod
    from training.trainer import Trainer

    prepared = stream_prepared(tmp_path / "data", n_train=3000, n_eval=400)
    monkeypatch.setattr(data_mod, "load", lambda task, **kw: prepared)
    interrupt_at = [3]
    step = Trainer._train_step

    def train_step(self, batch):
        stepped = step(self, batch)
        if self.step == interrupt_at[0]:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C: Python's handler raises KeyboardInterrupt
        return stepped

    monkeypatch.setattr(Trainer, "_train_step", train_step)
    run = tmp_path / "run"
    args = [
        "train",
        str(REPO / "configs" / "smoke.toml"),
        "--run-dir",
        str(run),
        "--progress",
        "off",
        "model.hidden_size=8",
        "batch_size=4",
        "seq_len=25",
        "epochs=1",
        "checkpoint_every=2",
    ]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "nlstm train: interrupted at step 3; " in err
    assert (
        f"{run / 'last.pt'} holds step 2 "
        "(written at each evaluation and every checkpoint_every=2 steps)" in err
    )
    command = err.strip().splitlines()[-1].strip()
    assert command.startswith("nlstm train ") and "--resume" in command
    interrupt_at[0] = -1
    assert main(shlex.split(command)[1:]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    steps = 3000 // (4 * 25)  # one epoch of batches of 4 rows x 25 characters
    assert re.fullmatch(
        rf"finished at step {steps} after \d+ s: best valid bpc \d\.\d{{4}} \(epoch 1\), "
        rf"its test bpc \d\.\d{{4}}\. Weights: {re.escape(str(run / 'best.pt'))}",
        out[-1],
    )
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["type"] for x in lines] == ["run", "resume", "eval"]
    for _ in range(2):  # a finished run resumed: nothing to do, nothing appended
        assert main(shlex.split(command)[1:]) == 0
        assert "all 1 epochs are done: nothing to do" in capsys.readouterr().out
    assert (run / "metrics.jsonl").read_text().splitlines() == lines


# --------------------------------------------------------------------------------------- export
def test_export_shows_progress_and_refuses_a_file_that_is_not_a_checkpoint(runs, tmp_path, capsys):
    import torch

    assert (
        main(["export", str(runs / "nlstm" / BEST), "--out", str(tmp_path / "x"), "--no-sequence"])
        == 0
    )
    captured = capsys.readouterr()
    steps = [line.split("] ", 1)[1] for line in captured.err.splitlines()]
    assert steps[:3] == [
        "loading torch and the exporter",
        f"reading {runs / 'nlstm' / BEST}",
        "tracing the step graph (torch.onnx.export, dynamo)",
    ]
    assert (
        steps[3].startswith("checking the step graph") and steps[-1] == f"writing {tmp_path / 'x'}"
    )
    assert captured.out.startswith(f"exported ptb char nlstm to {tmp_path / 'x'}")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")  # a pickled module, as many tools save
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    for name in ("model.pt", "notes.txt"):
        assert main(["export", str(tmp_path / name), "--out", str(tmp_path / "y")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(
            f"nlstm export: error: {tmp_path / name} is not an nlstm checkpoint: "
        )
        assert "weights_only" not in err and "best.pt and last.pt that `nlstm train` writes" in err
    assert not (tmp_path / "y").exists()


# -------------------------------------------------------------------------------------- plot
def test_plot_draws_several_runs(runs, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert (
        main(
            [
                "plot",
                str(runs / "nlstm"),
                str(runs / "lstm" / "metrics.jsonl"),
                "--out",
                str(out),
                "--splits",
                "train,valid,test",
                "--title",
                "t",
            ]
        )
        == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == str(out)
    default = plot_runs([runs / "nlstm"])  # default: FIRST_RUN/curves.png
    assert default == runs / "nlstm" / "curves.png" and default.is_file()
    two_panels = plot_runs([runs / "mnist"], out=tmp_path)  # NLL and error
    assert two_panels == tmp_path / "curves.png"


def test_plot_errors(runs, tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        plot_runs([runs / "nlstm"], out=tmp_path / "x.png", splits=["dev"])
    with pytest.raises(ValueError, match="cannot share a chart"):
        plot_runs([runs / "nlstm", runs / "mnist"], out=tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match=re.escape("no metrics.jsonl")):
        plot_runs([tmp_path / "nothing"])


# --------------------------------------------------------------------------------- visualize
@pytest.mark.parametrize("name", ["nlstm", "lstm"])
def test_visualize_writes_a_png_and_a_self_contained_page(runs, tmp_path, capsys, name):
    text = "the cat sat on a mat\nand €"  # '€' is outside the vocabulary
    out = tmp_path / name
    assert (
        main(
            [
                "visualize",
                str(runs / name / BEST),
                "--text",
                text,
                "--out",
                str(out),
                "--cells",
                "5",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.split() == [str(out / "cells.png"), str(out / "cells.html")]
    assert (out / "cells.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "cells.html").read_text(encoding="utf-8")
    assert "<script src" not in page and "http://" not in page and "https://" not in page
    assert "1 character(s) outside the vocabulary" in page
    blob = re.search(
        r'<script type="application/json" id="activations">(.*?)</script>', page, re.DOTALL
    )
    payload = json.loads(blob.group(1))
    assert payload["text"] == text
    names = [p["name"] for p in payload["panels"]]
    if name == "nlstm":  # the paper's Figure 3: inner memory beside the outer memory
        assert names == ["inner memory tanh(c~)", "outer memory c"]
    else:  # Figure 4: both layers of the stacked LSTM
        assert names == ["layer 2 tanh(c)", "layer 1 tanh(c)"]
    for p in payload["panels"]:
        assert len(p["values"]) == 5 and all(len(v) == len(text) for v in p["values"])
        assert all(-1 <= x <= 1 for v in p["values"] for x in v)
    assert page.count('class="row"') == 5 * len(names)


def test_cell_activations_are_the_stepwise_states(runs):
    import numpy as np
    import torch

    model = load_checkpoint(runs / "nlstm" / BEST).build_model()
    ids = np.array([3, 4, 5, 6, 7])
    panels = dict(cell_activations(model, ids))
    with torch.no_grad():  # the whole sequence at once ends in the same state
        _, state = model.core(torch.as_tensor(ids).reshape(-1, 1))
    _, c0, c1 = state[0]
    np.testing.assert_allclose(panels["outer memory c"][-1], c0[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(
        panels["inner memory tanh(c~)"][-1], np.tanh(c1[0].numpy()), atol=1e-5
    )


def test_visualize_errors(runs, tmp_path):
    with pytest.raises(ValueError, match="glimpse classifier"):
        visualize_checkpoint(runs / "mnist" / BEST, "abc", tmp_path)
    with pytest.raises(ValueError, match="at most 400"):
        visualize_checkpoint(runs / "nlstm" / BEST, "a" * 401, tmp_path)
    with pytest.raises(ValueError, match="must not be empty"):
        visualize_checkpoint(runs / "nlstm" / BEST, "", tmp_path)
    ck = load_checkpoint(runs / "nlstm" / BEST)
    ck.tokenizer = None
    from training.checkpoint import save_checkpoint

    save_checkpoint(ck, tmp_path / "notok.pt")
    with pytest.raises(ValueError, match="carries no tokenizer"):
        visualize_checkpoint(tmp_path / "notok.pt", "abc", tmp_path)
