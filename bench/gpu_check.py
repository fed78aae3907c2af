"""The GPU kit's one command: everything to check on a lent GPU, in a fixed time budget, ending
in a summary to paste into docs/performance.md and docs/results.md.

    python bench/gpu_check.py                       # on a CUDA machine: at most --budget-s 480
    python bench/gpu_check.py --device cpu --smoke  # the same stages on the CPU, tiny (CI)

Stages, each in its own process with its own time limit (a crash or a hang in one still leaves
a summary of the others):

  1. tests:       the CUDA tests (`pytest -m gpu`: the fused path on CUDA, the CUDA graphs);
  2. train_speed: bench/train_speed.py on the device: chars/s of nn.LSTM (cuDNN), the fused
                  NLSTM and the fused NLSTM in CUDA graphs, the ratios (goal: at least 0.8 of
                  cuDNN's) and the fraction of the GEMM peak each reaches;
  3. smoke:       a short training run on a synthetic character stream with and without
                  cuda_graphs: both learn, and end at the same weights;
  4. ptb:         the paper's PTB NLSTM 2x600 (configs/ptb-nlstm-2x600.toml, cuda_graphs on) for
                  as many steps as the budget has left (from stage 2's rate), then the
                  projected time of the paper's 35 epochs (goal: under 10 minutes on one
                  H100-class GPU). Needs the raw PTB files (--data-dir; skipped without them:
                  a lent machine has no network).

The summary is Markdown; the last line of the output is the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PTB_CONFIG = REPO / "configs" / "ptb-nlstm-2x600.toml"
PTB_EPOCHS = 35  # the paper's
GOAL_RATIO = 0.8  # of cuDNN's nn.LSTM
GOAL_MINUTES = 10.0  # 35 PTB epochs


# --smoke on the CPU: one torch thread per stage. The check is of the logic, not the speed, and
# on a shared 2-core machine two OpenMP threads per process slowed these runs up to 10x.
CHILD_ENV: dict[str, str] = {}


def run_stage(name: str, cmd: list[str], timeout: float) -> dict:
    """Run one stage's command; its status, seconds, and the tail of its output."""
    t0 = time.monotonic()
    if timeout < 5:
        return {
            "name": name,
            "status": "skipped",
            "reason": "no time left in the budget",
            "seconds": 0.0,
        }
    try:
        proc = subprocess.run(
            cmd,
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env={**os.environ, **CHILD_ENV},
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {
            "name": name,
            "status": "timeout",
            "seconds": round(time.monotonic() - t0, 1),
            "reason": f"ran past its {timeout:.0f} s",
            "output": out[-3000:],
        }
    status = "ok" if proc.returncode == 0 else "failed"
    return {
        "name": name,
        "status": status,
        "seconds": round(time.monotonic() - t0, 1),
        "returncode": proc.returncode,
        "output": (proc.stdout + proc.stderr)[-3000:],
        "stdout": proc.stdout,
    }


def pytest_counts(output: str) -> dict[str, int]:
    """pytest's closing line ("3 passed, 2 skipped in 4.1s") as counts."""
    counts = {}
    for line in output.splitlines()[::-1]:
        if " in " in line and any(w in line for w in ("passed", "failed", "skipped", "error")):
            for part in line.strip("= ").split(" in ")[0].split(","):
                n, _, word = part.strip().partition(" ")
                if n.isdigit():
                    counts[word.rstrip("s") if word.endswith("errors") else word] = int(n)
            break
    return counts


def find_ptb(data_dir: str) -> Path | None:
    """The raw-data folder holding ptb/ptb.char.train.txt: --data-dir when given (only it),
    else $NLSTM_DATA_DIR, the checkout's shared/data (what a lent machine receives) or
    ../shared/data."""
    places = (
        [data_dir]
        if data_dir
        else [
            os.environ.get("NLSTM_DATA_DIR", ""),
            REPO / "shared" / "data",
            REPO.parent / "shared" / "data",
        ]
    )
    for d in places:
        if d and (Path(d) / "ptb" / "ptb.char.train.txt").is_file():
            return Path(d)
    return None


def smoke_main(device: str, run_dir: Path) -> None:
    """Stage 3, run in a child process: train a small NLSTM on a synthetic stream twice."""
    from training.checkpoint import load_checkpoint
    from training.config import TrainConfig
    from training.testing.data import stream_prepared
    from training.trainer import LAST, read_metrics, train

    prepared = stream_prepared(run_dir / "data", n_train=20_000, n_eval=2_000)
    result = {}
    weights = {}
    for graphs in (True, False):
        cfg = TrainConfig(
            task="ptb",
            model={"hidden_size": 64, "depth": 2},
            batch_size=8,
            seq_len=50,
            epochs=1,
            max_steps=40,
            checkpoint_every=0,
            seed=1,
            device=device,
            cuda_graphs=graphs,
            optimizer={"lr": 0.01},
        )
        d = run_dir / f"graphs-{graphs}"
        t0 = time.monotonic()
        train(cfg, d, prepared=prepared, progress=False, log=lambda *_: None)
        _, evals = read_metrics(d)
        result[f"graphs={graphs}"] = {
            "seconds": round(time.monotonic() - t0, 2),
            "train_chars_per_s": evals[-1]["train_items_per_s"],
            "valid_bpc": evals[-1]["valid_bpc"],
        }
        weights[graphs] = load_checkpoint(d / LAST).model
    diff = max(
        (weights[True][k].float() - weights[False][k].float()).abs().max().item()
        for k in weights[True]
    )
    result["max_weight_difference"] = diff
    # learned: well below the log2(vocab) bits of a uniform guess; the same weights either way
    uniform = math.log2(prepared.vocab_size)
    result["uniform_bpc"] = uniform
    result["learned"] = all(
        r["valid_bpc"] < 0.8 * uniform for k, r in result.items() if k.startswith("graphs=")
    )
    result["same_weights"] = diff < 1e-3
    print(json.dumps(result))
    if not (result["learned"] and result["same_weights"]):
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument(
        "--budget-s", type=float, default=480.0, help="all stages together (default 8 min)"
    )
    ap.add_argument(
        "--smoke", action="store_true", help="tiny sizes, a few steps (CI; with --device cpu)"
    )
    ap.add_argument("--data-dir", default="", help="raw data folder with ptb/ (see find_ptb)")
    ap.add_argument("--smoke-stage", default="", help=argparse.SUPPRESS)  # stage 3's child process
    args = ap.parse_args()
    if args.smoke_stage:
        smoke_main(args.device, Path(args.smoke_stage))
        return

    if args.smoke and args.device == "cpu":
        CHILD_ENV["OMP_NUM_THREADS"] = "1"
    start = time.monotonic()

    def left() -> float:
        """Seconds of the budget not yet spent."""
        return args.budget_s - (time.monotonic() - start)

    py = sys.executable
    device_name, versions = describe(args.device)
    stages = []

    # 1. the CUDA tests (on the CPU they are all skipped: the stage checks they are collected)
    tests = ["tests/test_nlstm_graphs.py"] if args.smoke else ["tests"]
    s = run_stage(
        "tests",
        [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *tests],
        min(left() * 0.3, 150),
    )
    s["counts"] = pytest_counts(s.get("output", ""))
    if (
        s["status"] == "failed"
        and s["counts"]
        and not s["counts"].get("failed")
        and not s["counts"].get("error")
    ):
        s["status"] = "ok"  # pytest exits 5 when every test is deselected/skipped
    stages.append(s)

    # 2. training speed
    speed_cmd = [py, "bench/train_speed.py", "--device", args.device, "--no-loop"]
    speed_cmd += (
        ["--smoke", "--kinds", "nn.LSTM", "nlstm-fused"] if args.smoke else ["--repeats", "10"]
    )
    s = run_stage("train_speed", speed_cmd, min(left() * 0.35, 120))
    if s["status"] == "ok":
        s["result"] = json.loads(s["stdout"].splitlines()[-1])[0]
    stages.append(s)

    # 3. a training smoke on synthetic data, with and without CUDA graphs
    with tempfile.TemporaryDirectory() as tmp:
        s = run_stage(
            "smoke",
            [py, "bench/gpu_check.py", "--device", args.device, "--smoke-stage", tmp],
            min(left() * 0.4, 120),
        )
        if s["status"] in ("ok", "failed") and s["stdout"].strip():
            s["result"] = json.loads(s["stdout"].splitlines()[-1])
        stages.append(s)

        # 4. PTB steps for the rest of the budget
        stages.append(ptb_stage(args, left, stages[1].get("result"), Path(tmp)))

    summary = {
        "device": args.device,
        "device_name": device_name,
        **versions,
        "budget_s": args.budget_s,
        "seconds": round(time.monotonic() - start, 1),
        "stages": [{k: v for k, v in st.items() if k not in ("output", "stdout")} for st in stages],
    }
    print(render(summary, stages))
    print(json.dumps(summary))


def describe(device: str) -> tuple[str, dict]:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "CPU"
    if device == "cpu" and Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return name, {"torch": torch.__version__, "cuda": torch.version.cuda}


def ptb_stage(args, left, speed: dict | None, tmp: Path) -> dict:
    data = find_ptb(args.data_dir)
    if data is None:
        where = args.data_dir or "$NLSTM_DATA_DIR, shared/data or ../shared/data"
        return {
            "name": "ptb",
            "status": "skipped",
            "seconds": 0.0,
            "reason": f"no raw PTB files (ptb/ptb.char.train.txt) under {where}",
        }
    # steps that fit: the rate stage 2 measured for the kind this run trains, the budget left
    # minus time for start-up, data preparation and the closing evaluation
    kinds = (speed or {}).get("kinds", {})
    rate = (kinds.get("nlstm-graphs") or kinds.get("nlstm-fused") or {}).get("wall_chars_per_s")
    reserve = 30.0 if args.smoke else 60.0
    if args.smoke:
        steps = 2
    elif rate:
        steps = max(1, int((left() - reserve) * rate / 3200 * 0.8))
    else:
        steps = 50
    run_dir = tmp / "ptb"
    cmd = [
        sys.executable,
        "-m",
        "training.cli",
        "train",
        str(PTB_CONFIG),
        "--run-dir",
        str(run_dir),
        "--max-steps",
        str(steps),
        "--progress",
        "off",
        f"device={args.device}",
        f"cuda_graphs={'true' if args.device == 'cuda' else 'false'}",
        f"data_dir={data}",
        "checkpoint_every=0",
        f"max_eval_items={3200 if args.smoke else 20000}",
    ]
    if args.smoke:
        cmd += ["max_train_items=20000"]
    s = run_stage("ptb", cmd, left() - 5)
    s["steps"] = steps
    metrics = run_dir / "metrics.jsonl"
    if s["status"] == "ok" and metrics.is_file():
        evals = [json.loads(line) for line in metrics.read_text().splitlines() if '"eval"' in line]
        if evals:
            last = evals[-1]
            s["train_chars_per_s"] = last.get("train_items_per_s")
            s["valid_bpc"] = last.get("valid_bpc")
            s["step"] = last.get("step")
            # the record's epoch is epoch + batch / batches per epoch (4 decimals): the epoch's
            # length in steps, without preparing the data here a second time
            if s["train_chars_per_s"] and last.get("epoch"):
                s["batches_per_epoch"] = per_epoch = round(s["step"] / last["epoch"])
                s["minutes_for_35_epochs"] = (
                    PTB_EPOCHS * per_epoch * 3200 / s["train_chars_per_s"] / 60
                )
    return s


def render(summary: dict, stages: list[dict]) -> str:
    """The Markdown block to paste into the docs."""
    title = (
        f"### gpu_check: {summary['device_name']} ({summary['device']}), torch {summary['torch']}, "
        f"CUDA {summary['cuda'] or '-'}, "
        f"{summary['seconds']:.0f} s of a {summary['budget_s']:.0f} s budget"
    )
    out = [title, "", "| stage | status | seconds | result |", "|---|---|---|---|"]
    for s in stages:
        out.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {stage_result(s)} |")
    speed = stages[1].get("result")
    if speed:
        head = (
            f"Training speed (batch {speed['batch']}, sequence {speed['seq']}, hidden "
            f"{speed['hidden']}; GEMM peak this run {speed['peak_gflops']:,.0f} GFLOP/s):"
        )
        out += [
            "",
            head,
            "",
            "| kind | chars/s | ratio vs nn.LSTM | GFLOP/s | of peak |",
            "|---|---|---|---|---|",
        ]
        for k, r in speed["kinds"].items():
            out.append(
                f"| {k} | {r['wall_chars_per_s']:,.0f} | {r['wall_ratio']:.2f} | "
                f"{r['wall_gflops']:,.0f} | {r['wall_peak_fraction']:.0%} |"
            )
        best = max(
            (r["wall_ratio"] for k, r in speed["kinds"].items() if k != "nn.LSTM"), default=None
        )
        if best is not None:
            verdict = "met" if best >= GOAL_RATIO else "not met"
            out += [
                "",
                f"Goal: the NLSTM at >= {GOAL_RATIO} of nn.LSTM: best {best:.2f}, {verdict}.",
            ]
    ptb = stages[3]
    if ptb.get("minutes_for_35_epochs") is not None:
        m = ptb["minutes_for_35_epochs"]
        line = (
            f"PTB: {ptb['step']} steps at {ptb['train_chars_per_s']:,.0f} chars/s, valid BPC "
            f"{ptb['valid_bpc']:.3f}; 35 epochs ({ptb['batches_per_epoch']} steps each) would take "
            f"{m:.1f} min (goal: under {GOAL_MINUTES:.0f}: "
            f"{'met' if m < GOAL_MINUTES else 'not met'})."
        )
        out += ["", line]
    return "\n".join(out)


def stage_result(s: dict) -> str:
    if s.get("reason"):
        return s["reason"]
    if s["name"] == "tests":
        return ", ".join(f"{n} {w}" for w, n in s.get("counts", {}).items()) or "no pytest summary"
    if s["name"] == "train_speed" and s.get("result"):
        k = s["result"]["kinds"]
        return ", ".join(
            f"{name} {r['wall_ratio']:.2f}" for name, r in k.items() if name != "nn.LSTM"
        )
    if s["name"] == "smoke" and s.get("result"):
        r = s["result"]
        return (
            f"learned: {r['learned']}, same weights with and without graphs: {r['same_weights']} "
            f"(max difference {r['max_weight_difference']:.1e})"
        )
    if s["name"] == "ptb" and s.get("train_chars_per_s"):
        return (
            f"{s['step']} steps, {s['train_chars_per_s']:,.0f} chars/s, valid BPC "
            f"{s['valid_bpc']:.3f}"
        )
    return s.get("output", "")[-200:].replace("\n", " ").replace("|", "/")


if __name__ == "__main__":
    main()
