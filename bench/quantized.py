"""int8 against float32, in one run: the raw step rate, the served characters/s, the cost.

For each pair of bundled models (FLOAT32 folder, its -int8 folder) it measures, and prints with
the ratios and the issue's goals:

  1. the raw step rate at batch 1 and 64 (serving.runtime's step, as the server's scheduler
     calls it), both models alternating in --rounds rounds, two ways:
       cpu   one onnxruntime thread, the calling thread's CPU time per step (other processes do
             not inflate it: the figure to trust on a busy machine), best round;
       wall  onnxruntime's default threads, wall-clock time per step; each int8 window is
             compared with the float32 windows around it, the median of those ratios;
  2. served characters/s (PTB only; --skip-serve to leave it out): one `nlstm serve` process
     serving both models, --streams concurrent Generate streams (bench/serve_load.py's client),
     float32 and int8 windows alternating, the median of the per-window ratios;
  3. the cost on the full test splits (--data-dir; skipped without the data): both models
     evaluated here (training.quantize.evaluate, the trainer's evaluation batches), beside the
     figures meta.json recorded at quantization.

Nothing here imports torch (onnxruntime's speed is what is measured).

    python bench/quantized.py                          # the bundled pairs, data from ../shared/data
    python bench/quantized.py --pairs ptb-nlstm --skip-serve --skip-cost
    python bench/quantized.py --smoke                  # a tiny random pair, a few seconds (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

# The goals: raw step-rate ratios (int8 over float32) for the PTB model, the served
# characters/s ratio at 64 streams, and the cost on the full test splits.
STEP_GOALS = {"1": 2.5, "64": 1.8}
SERVE_GOAL = 1.7
COST_GOALS = {
    "ptb": ("test_bpc", "+", 0.005),
    "mnist": ("test_acc", "-", 0.002),
    "poems": ("test_ppl", "x", 1.01),
}


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next(
            (
                line.split(":", 1)[1].strip()
                for line in out.splitlines()
                if line.startswith("Model name")
            ),
            "?",
        )
    except OSError:
        name = "?"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{name}, {os.cpu_count()} CPUs, load average {load:.1f} at the start"


# ------------------------------------------------------------------------------ raw step rate
def step_rates(f32: Path, int8: Path, batches: list[int], rounds: int, seconds: float) -> dict:
    """CPU (1 thread, thread CPU time) and wall (default threads) microseconds per step."""
    from serving.runtime import load_model

    out: dict = {"cpu_us": {}, "wall_us": {}, "wall_ratios": {}}
    models = {
        "cpu": {
            k: load_model(p, providers="cpu", intra_op_threads=1, inter_op_threads=1)
            for k, p in (("float32", f32), ("int8", int8))
        },
        "wall": {k: load_model(p, providers="cpu") for k, p in (("float32", f32), ("int8", int8))},
    }
    rng = np.random.default_rng(0)
    for b in batches:
        m0 = models["cpu"]["float32"]
        if m0.kind == "char":
            x = rng.integers(0, m0.output_size, size=b).astype(np.int64)
        else:
            x = rng.random((b, m0.meta.input_size), dtype=np.float32)
        state = m0.initial_state(b)
        for how, clock in (("cpu", time.thread_time), ("wall", time.perf_counter)):
            per: dict[str, list[float]] = {"float32": [], "int8": []}
            order = ["float32", "int8"] * rounds + ["float32"]
            for k in order:
                m = models[how][k]
                for _ in range(3):
                    m.step(x, state, check=False)
                n, t0 = 0, clock()
                w0 = time.perf_counter()
                while time.perf_counter() - w0 < seconds:
                    m.step(x, state, check=False)
                    n += 1
                per[k].append((clock() - t0) / n * 1e6)
            if how == "cpu":
                out["cpu_us"][str(b)] = {k: min(v) for k, v in per.items()}
            else:
                f, q = per["float32"], per["int8"]
                ratios = [((f[i] + f[i + 1]) / 2) / q[i] for i in range(len(q))]
                out["wall_us"][str(b)] = {k: statistics.median(v) for k, v in per.items()}
                out["wall_ratios"][str(b)] = ratios
    return out


# ------------------------------------------------------------------------------ served chars/s
def served_rates(f32: Path, int8: Path, streams: int, rounds: int, seconds: float) -> dict:
    """One server over both models; float32 and int8 windows of `streams` Generate streams
    alternating, starting and ending with float32; ratio of each int8 window to its neighbours."""
    from serve_load import load

    from serving.testing.process import Server

    with tempfile.TemporaryDirectory(prefix="nlstm-quant-serve-") as tmp:
        root = Path(tmp)
        for p in (f32, int8):
            (root / p.name).symlink_to(p.resolve())
        per: dict[str, list[float]] = {f32.name: [], int8.name: []}
        with Server(root, "--max-batch", str(streams), "--max-sessions", "4096") as server:
            for name in [f32.name, int8.name] * rounds + [f32.name]:
                res = asyncio.run(
                    load(server.port, name, streams, seconds, warmup=min(0.5, seconds / 4))
                )
                per[name].append(res["chars_per_s"])
                time.sleep(0.2)  # the server drops the cancelled streams
            server.stop()
    f, q = per[f32.name], per[int8.name]
    ratios = [q[i] / ((f[i] + f[i + 1]) / 2) for i in range(len(q))]
    return {
        "chars_per_s": {"float32": statistics.median(f), "int8": statistics.median(q)},
        "windows": per,
        "ratios": ratios,
        "ratio": statistics.median(ratios),
    }


# --------------------------------------------------------------------------------------- cost
def test_costs(f32: Path, int8: Path, data_dir: Path | None, cache_dir: Path | None) -> dict:
    from serving.formats import ExportMeta
    from serving.runtime import load_model
    from training.quantize import EvalData, evaluate

    meta = ExportMeta.from_folder(f32)
    data = EvalData.for_task(meta, data_dir, cache_dir)
    out = {}
    for k, p in (("float32", f32), ("int8", int8)):
        out[k] = evaluate(
            load_model(p, providers="cpu", intra_op_threads=1, inter_op_threads=1), data, "test"
        )
    return out


def smoke_pair(root: Path) -> tuple[Path, Path]:
    """A tiny random char model and its int8 copy, on synthetic data (torch in a subprocess)."""
    code = (
        "import sys; from pathlib import Path; from training.testing.models import "
        "export_random_char; export_random_char(Path(sys.argv[1]), 32, "
        "sys.stdin.read().splitlines())"
    )
    lines = [line for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines() if line]
    subprocess.run(
        [sys.executable, "-c", code, str(root / "random-nlstm")],
        input="\n".join(lines),
        text=True,
        check=True,
    )  # the lines: bench/_server.py's readme_lines
    from serving.formats import TOKENIZER_FILE, Tokenizer
    from training.data.task import StreamSplit
    from training.quantize import EvalData, quantize_folder

    f32 = root / "random-nlstm"
    tok = Tokenizer.from_file(f32 / TOKENIZER_FILE)
    ids = np.random.default_rng(0).integers(0, tok.vocab_size, size=3000).astype(np.uint8)
    data = EvalData(
        "stream",
        {s: StreamSplit(ids) for s in ("train", "valid", "test")},
        4,
        20,
        tok.model_proto,
        "synthetic",
    )
    quantize_folder(
        f32,
        root / "random-nlstm-int8",
        data=data,
        method="dynamic-per-channel",
        screen_batches=2,
        timing_rounds=1,
        thresholds=None,
    )
    return f32, root / "random-nlstm-int8"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=REPO / "exported")
    ap.add_argument(
        "--pairs",
        nargs="+",
        default=["ptb-nlstm", "mnist-nlstm", "poems-nlstm"],
        help="float32 folders under --models; each is compared with FOLDER-int8",
    )
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds per measurement")
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds per raw-rate window")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--serve-seconds", type=float, default=6.0, help="seconds per served window")
    ap.add_argument("--serve-rounds", type=int, default=4)
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a tiny random pair, short windows (CI)")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args(argv)
    tmp = None
    if args.smoke:
        tmp = tempfile.TemporaryDirectory(prefix="nlstm-quant-bench-")
        f32, q = smoke_pair(Path(tmp.name))
        pairs = [(f32, q)]
        args.rounds, args.seconds, args.streams, args.serve_seconds, args.serve_rounds = (
            2,
            0.2,
            4,
            1.0,
            1,
        )
        args.skip_cost = True
    else:
        pairs = [(args.models / n, args.models / f"{n}-int8") for n in args.pairs]
    print(f"machine: {machine()}", flush=True)
    report: dict = {"machine": machine(), "pairs": {}}
    for f32, q in pairs:
        from serving.formats import ExportMeta

        qm = ExportMeta.from_folder(q).quantization
        size = {
            k: sum(p.stat().st_size for p in folder.iterdir()) / 2**20
            for k, folder in (("float32", f32), ("int8", q))
        }
        print(
            f"\n{f32.name} ({size['float32']:.1f} MiB) vs {q.name} ({size['int8']:.1f} MiB, "
            f"{qm['settings']['name']})",
            flush=True,
        )
        r: dict = {"sizes_mib": size, "settings": qm["settings"]}
        rates = step_rates(f32, q, [1, 64], args.rounds, args.seconds)
        r["step"] = rates
        for b in ("1", "64"):
            cpu, wall = rates["cpu_us"][b], rates["wall_us"][b]
            cpu_ratio = cpu["float32"] / cpu["int8"]
            wall_ratio = statistics.median(rates["wall_ratios"][b])
            goal = STEP_GOALS.get(b) if f32.name.startswith("ptb") else None
            verdict = (
                ""
                if goal is None
                else f"  goal {goal}x: {'met' if cpu_ratio >= goal else 'NOT met'} (cpu)"
            )
            print(
                f"  step batch {b:>2}: cpu (1 thread) {cpu['float32']:8.1f} -> {cpu['int8']:7.1f} "
                f"us = {cpu_ratio:.2f}x;  wall (default threads) {wall['float32']:8.1f} -> "
                f"{wall['int8']:7.1f} us = {wall_ratio:.2f}x (windows "
                f"{min(rates['wall_ratios'][b]):.2f}-{max(rates['wall_ratios'][b]):.2f}){verdict}",
                flush=True,
            )
        if not args.skip_serve and (f32.name.startswith("ptb") or args.smoke):
            s = served_rates(f32, q, args.streams, args.serve_rounds, args.serve_seconds)
            r["serve"] = s
            verdict = (
                ""
                if args.smoke
                else f"  goal {SERVE_GOAL}x: {'met' if s['ratio'] >= SERVE_GOAL else 'NOT met'}"
            )
            print(
                f"  served, {args.streams} streams: {s['chars_per_s']['float32']:,.0f} -> "
                f"{s['chars_per_s']['int8']:,.0f} chars/s = {s['ratio']:.2f}x (windows "
                f"{min(s['ratios']):.2f}-{max(s['ratios']):.2f}){verdict}",
                flush=True,
            )
        rec_f, rec_q = qm["reference_figures"], qm["figures"]
        task = ExportMeta.from_folder(f32).task
        key, how, goal = COST_GOALS.get(task, ("test_bpc", "+", None))
        line = f"  recorded at quantization: test {key[5:]} {rec_f[key]:.5f} -> {rec_q[key]:.5f}"
        if not args.skip_cost and args.data_dir and args.data_dir.is_dir():
            c = test_costs(f32, q, args.data_dir, args.cache_dir)
            r["cost"] = c
            metric = key[5:]
            a, b_ = c["float32"][metric], c["int8"][metric]
            if how == "+":
                delta, ok = f"{b_ - a:+.5f}", b_ - a <= goal
            elif how == "-":
                delta, ok = f"{(b_ - a) * 100:+.3f} points", a - b_ <= goal
            else:
                delta, ok = f"{(b_ / a - 1) * 100:+.3f}%", b_ / a <= goal
            print(
                f"  full test split ({c['float32']['items']:,} "
                f"{'images' if metric == 'acc' else 'characters'}): {metric} {a:.5f} -> {b_:.5f} "
                f"({delta}; nll {c['float32']['nll']:.5f} -> {c['int8']['nll']:.5f})  goal: "
                f"{'met' if ok else 'NOT met'}",
                flush=True,
            )
        print(line, flush=True)
        report["pairs"][f32.name] = r
    if args.json:
        print(
            json.dumps(
                report,
                default=lambda o: o if not isinstance(o, float) or math.isfinite(o) else None,
            )
        )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
