"""The smoke config learns: `nlstm train configs/smoke.toml` on the real PTB. With the tests' one
torch thread (tests/conftest.py) it takes about 25 s, preparing the PTB cache included (24.6 s
wall, 18.5 s CPU at load 2.6 on the 2-core machine; 150 s at load 10). Validation BPC must fall
well below the unigram entropy of the training text (what a model that ignores context
achieves). Skipped without the datasets (tests/conftest.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from training import data
from training.cli import main
from training.config import load_config
from training.trainer import BEST, LAST, read_metrics

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"


def unigram_entropy(ids: np.ndarray) -> float:
    counts = np.bincount(np.asarray(ids, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


@pytest.mark.slow
def test_smoke_run_learns(shared_data, tmp_path, capsys):
    cache = tmp_path / "cache"
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            str(SMOKE),
            "--run-dir",
            str(run),
            f"data_dir={shared_data}",
            f"cache_dir={cache}",
        ]
    )
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]  # a summary a person reads
    config = load_config(SMOKE)
    prepared = data.load("ptb", data_dir=shared_data, cache_dir=cache)
    entropy = unigram_entropy(prepared.splits["train"].ids[: config.max_train_items])
    assert 4.0 < entropy < 4.6  # PTB's characters: about 4.33 bits

    header, evals = read_metrics(run)
    assert header["config"]["max_train_items"] == config.max_train_items
    assert [e["epoch"] for e in evals] == list(range(1, config.epochs + 1))
    final = evals[-1]
    print(f"smoke: valid_bpc {final['valid_bpc']:.3f}, unigram entropy {entropy:.3f}")
    assert final["valid_bpc"] < entropy - 1.0  # well below: it uses the context
    assert final["valid_bpc"] < evals[0]["valid_bpc"]
    assert math.isfinite(final["test_bpc"]) and final["best_test_bpc"] > 0
    assert (run / LAST).is_file() and (run / BEST).is_file()
    assert last.startswith(f"finished at step {evals[-1]['step']} after ")
    assert f"best valid bpc {evals[-1]['best_valid_bpc']:.4f}" in last and "its test bpc" in last
