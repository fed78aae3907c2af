"""training/summary.py and `nlstm summary`: figures at best validation, rows grouped by seed."""

import json
import re
import statistics

import pytest

from training.cli import main
from training.summary import SummaryError, group, markdown, read_run, row_name


def _write_run(d, task, seed, evals, epochs=2, params=1000):
    d.mkdir(parents=True)
    lines = [
        {"type": "run", "task": task, "seed": seed, "params": params, "config": {"epochs": epochs}}
    ]
    lines += [dict(type="eval", **e) for e in evals]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return d


def _mnist_eval(epoch, vnll, tnll, vacc, tacc):
    return {
        "epoch": epoch,
        "step": 10 * epoch,
        "best_valid_nll": vnll,
        "best_test_nll": tnll,
        "best_valid_acc": vacc,
        "best_test_acc": tacc,
        "elapsed_s": 5.0 * epoch,
    }


def test_read_run_takes_the_last_evaluation_and_ignores_a_cut_line(tmp_path):
    d = _write_run(
        tmp_path / "mnist-nlstm-s1",
        "mnist",
        1,
        [_mnist_eval(1, 0.3, 0.31, 0.9, 0.89), _mnist_eval(2, 0.2, 0.21, 0.95, 0.94)],
    )
    with (d / "metrics.jsonl").open("a") as f:
        f.write('{"type": "eval", "epoch": 3, "best_val')  # killed mid-write
    r = read_run(d)
    assert (r.epoch, r.step, r.seed, r.finished) == (2, 20, 1, True)
    assert r.valid == {"nll": 0.2, "acc": 0.95} and r.test == {"nll": 0.21, "acc": 0.94}


def test_rows_group_seeds_with_mean_and_sample_std(tmp_path):
    runs = []
    accs = [0.95, 0.97, 0.96]
    for seed, acc in zip((1, 2, 3), accs, strict=True):
        runs.append(
            read_run(
                _write_run(
                    tmp_path / f"mnist-lstm-2x75-s{seed}",
                    "mnist",
                    seed,
                    [_mnist_eval(2, 0.2, 0.2 + seed / 100, acc, acc)],
                )
            )
        )
    runs.append(
        read_run(
            _write_run(
                tmp_path / "mnist-lstm-1x100-s1", "mnist", 1, [_mnist_eval(1, 0.4, 0.41, 0.9, 0.9)]
            )
        )
    )
    rows = group(runs)
    assert [r.name for r in rows] == ["mnist-lstm-2x75", "mnist-lstm-1x100"]
    mean, std = rows[0].mean_std("test", "acc")
    assert mean == pytest.approx(statistics.fmean(accs)) and std == pytest.approx(0.01)
    table = markdown(rows)
    assert "| mnist-lstm-2x75 | 1,2,3 | 1,000 | 2 | 0.2000 ± 0.0000 | 0.2200 ± 0.0100 |" in table
    assert "96.00% ± 1.00" in table
    assert (
        "| mnist-lstm-1x100 | 1 | 1,000 | 1 (running) | 0.4000 | 0.4100 | 90.00% | 90.00% |"
        in table
    )


def test_row_name_strips_only_a_trailing_seed():
    assert row_name("ptb-lstm-2x600-s12") == "ptb-lstm-2x600"
    assert row_name("poems-nlstm-2x32-seed3") == "poems-nlstm-2x32"
    assert row_name("ptb-lstm-2x600-r1") == "ptb-lstm-2x600-r1"


def test_refusals(tmp_path):
    with pytest.raises(SummaryError, match=re.escape("no metrics.jsonl")):
        read_run(tmp_path)
    d = _write_run(tmp_path / "a", "ptb", 1, [])
    with pytest.raises(SummaryError, match="no evaluation yet"):
        read_run(d)
    p = read_run(
        _write_run(
            tmp_path / "p",
            "poems",
            1,
            [{"epoch": 1, "step": 1, "best_valid_ppl": 300.0, "best_test_ppl": 310.0}],
        )
    )
    m = read_run(_write_run(tmp_path / "m", "mnist", 1, [_mnist_eval(1, 0.3, 0.3, 0.9, 0.9)]))
    with pytest.raises(SummaryError, match="several tasks"):
        markdown(group([p, m]))


def test_cli_prints_the_table(tmp_path, capsys):
    _write_run(
        tmp_path / "poems-nlstm-2x32-s1",
        "poems",
        1,
        [{"epoch": 2, "step": 4, "best_valid_ppl": 201.234, "best_test_ppl": 205.0}],
    )
    assert main(["summary", str(tmp_path / "poems-nlstm-2x32-s1")]) == 0
    assert "| poems-nlstm-2x32 | 1 | 1,000 | 2 | 201.23 | 205.00 |" in capsys.readouterr().out
    assert main(["summary", str(tmp_path / "missing")]) == 2


def test_cli_leaves_out_runs_that_have_not_evaluated_yet(tmp_path, capsys):
    """`nlstm summary runs/poems-*/` while a queue runs: the run that has only started is left
    out with a line on stderr; the table has the others. With none evaluated, it refuses."""
    done = _write_run(
        tmp_path / "poems-nlstm-2x32-s1",
        "poems",
        1,
        [{"epoch": 2, "step": 4, "best_valid_ppl": 201.234, "best_test_ppl": 205.0}],
    )
    started = _write_run(tmp_path / "poems-nlstm-2x32-s2", "poems", 2, [])
    assert main(["summary", str(done), str(started)]) == 0
    out, err = capsys.readouterr()
    assert "| poems-nlstm-2x32 | 1 | 1,000 | 2 | 201.23 | 205.00 |" in out
    assert f"left out {started}" in err and "no evaluation yet" in err
    assert main(["summary", str(started)]) == 2
    assert "none of the runs given has an evaluation yet" in capsys.readouterr().err
    assert main(["summary", str(done), str(tmp_path / "missing")]) == 2  # not a run: an error
