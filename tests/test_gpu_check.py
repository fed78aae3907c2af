"""bench/gpu_check.py, the GPU kit's one command, in its CPU smoke mode: its stages and the
summary it prints, everything of it that can run without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    """bench/gpu_check.py's stages and summary, run on the CPU with tiny sizes: what it will
    print on a lent GPU, minus the GPU. PTB steps run when the real data is there."""
    from conftest import SHARED_DATA

    has_ptb = (SHARED_DATA / "ptb" / "ptb.char.train.txt").is_file()
    data_dir = SHARED_DATA if has_ptb else tmp_path / "no-data"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_check.py"),
            "--device",
            "cpu",
            "--smoke",
            "--budget-s",
            "400",
            "--data-dir",
            str(data_dir),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    summary = json.loads(out.splitlines()[-1])
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["tests", "train_speed", "smoke", "ptb"]
    # on the CPU every CUDA test is collected and skipped, none fails
    assert stages["tests"]["status"] == "ok" and stages["tests"]["counts"]["skipped"] >= 5
    assert "failed" not in stages["tests"]["counts"]
    speed = stages["train_speed"]
    assert speed["status"] == "ok" and set(speed["result"]["kinds"]) == {"nn.LSTM", "nlstm-fused"}
    smoke = stages["smoke"]
    assert (
        smoke["status"] == "ok" and smoke["result"]["learned"] and smoke["result"]["same_weights"]
    )
    ptb = stages["ptb"]
    if has_ptb:
        assert ptb["status"] == "ok" and ptb["step"] == 2 and ptb["valid_bpc"] > 0
        assert ptb["minutes_for_35_epochs"] > 0 and "35 epochs" in out
    else:
        assert ptb["status"] == "skipped" and "no raw PTB files" in ptb["reason"]
    # the Markdown summary to paste into the docs
    assert "| stage | status | seconds | result |" in out and "| smoke | ok |" in out
    assert "Goal: the NLSTM at >= 0.8 of nn.LSTM" in out
