"""The ONNX inference benchmark has a smoke mode, and it runs (onnxruntime measured without
torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_onnx_step_smoke():
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "onnx_step.py"),
            "--smoke",
            "--threads",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    figures = json.loads(lines[-1])
    assert figures["threads"] == 1 and not figures["onnxruntime"]["torch_loaded"]
    for side in ("onnxruntime", "torch"):
        assert all(v > 0 for v in figures[side]["step_us"].values())
        assert sorted(figures[side]["step_us"]) == ["1", "64"]
    step_rows = [line for line in lines if line.strip().startswith("batch ")]
    assert len(step_rows) == 2 and all(line.rstrip().endswith("x") for line in step_rows)
    for way in (
        "onnxruntime step graph",
        "onnxruntime sequence graph",
        "torch eager",
        "torch whole sequence",
    ):
        assert any(line.strip().startswith(way) for line in lines), way
