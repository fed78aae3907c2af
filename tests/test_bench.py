"""Every benchmark script has a smoke mode, and it runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_speed_smoke():
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "train_speed.py"), "--smoke", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=REPO, check=True,
    ).stdout
    lines = [line for line in out.splitlines() if "chars/s" in line]
    assert [line.split()[0] for line in lines] == ["nn.LSTM", "nlstm-fused", "nlstm-loop"]
    for line in lines:
        assert float(line.split()[1].replace(",", "")) > 0
        assert float(line.split()[-1]) > 0  # the ratio against nn.LSTM


def test_hmlstm_copy_smoke():
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hmlstm_copy.py"), "--smoke"],
        capture_output=True, text=True, timeout=300, cwd=REPO, check=True,
    ).stdout
    assert "layer 2:" in out and "saved" in out
