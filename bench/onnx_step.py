"""Inference speed: the exported graphs on onnxruntime against eager torch, in one run.

For the paper's PTB model (NLSTM depth 2, 600 cells, vocabulary 50: 4.47M parameters, random
weights) it measures

  * one step at batch 1 and at batch 64: ExportedModel.step (serving/runtime.py, the step
    graph) against the torch model's forward on one step;
  * scoring 10,000 characters at batch 1: the step graph called once per character from
    Python, the sequence graph (one ONNX Scan call), the torch model stepped once per character,
    and torch's whole-sequence forward (the fused path training uses);

and prints the figures and the ratios. onnxruntime is measured in a subprocess that never
imports torch: in one process torch's OpenMP threads slow onnxruntime 2.5-3.5x on a 2-core CPU
(and the serving image does not carry torch). Both sides use the same thread count.

    python bench/onnx_step.py                # the 4.47M model
    python bench/onnx_step.py --smoke        # a tiny model and short runs, for CI
    python bench/onnx_step.py --threads 1    # one thread on each side
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _median_us(fn, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


# ------------------------------------------------------------- onnxruntime side (no torch)
def ort_worker(folder: str, batches: list[int], chars: int, repeats: int, threads: int) -> dict:
    import numpy as np

    from serving.runtime import load_model

    m = load_model(folder, providers="cpu", intra_op_threads=threads, inter_op_threads=1)
    assert m.has_sequence_graph, "the benchmark exports with the sequence graph"
    rng = np.random.default_rng(0)
    V = m.output_size
    out = {"device": m.device, "step_us": {}}
    for b in batches:
        x, s = rng.integers(0, V, size=b), m.initial_state(b)
        out["step_us"][str(b)] = _median_us(lambda x=x, s=s: m.step(x, s), repeats)
    ids = rng.integers(0, V, size=(chars, 1))
    s0 = m.initial_state(1)

    def step_loop():
        s = s0
        for t in range(chars):
            _, s = m.step(ids[t], s)

    def sequence_graph():
        m.run(ids, s0)

    rounds = 2
    out["score_step_loop_s"] = min(_median_us(step_loop, 1, warmup=0) for _ in range(rounds)) / 1e6
    out["score_sequence_s"] = (
        min(_median_us(sequence_graph, 1, warmup=1) for _ in range(rounds)) / 1e6
    )
    out["torch_loaded"] = "torch" in sys.modules
    return out


# ------------------------------------------------------------------------------ torch side
def torch_side(model, batches: list[int], chars: int, repeats: int) -> dict:
    import torch

    out = {"step_us": {}}
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in batches:
            x, s = torch.randint(0, V, (1, b), generator=g), model.initial_state(b)
            out["step_us"][str(b)] = _median_us(lambda x=x, s=s: model(x, s), repeats)
        ids = torch.randint(0, V, (chars, 1), generator=g)

        def step_loop():
            s = model.initial_state(1)
            for t in range(chars):
                _, s = model(ids[t : t + 1], s)

        rounds = 2
        out["score_step_loop_s"] = (
            min(_median_us(step_loop, 1, warmup=0) for _ in range(rounds)) / 1e6
        )
        out["score_fused_s"] = (
            min(_median_us(lambda: model(ids), 1, warmup=1) for _ in range(rounds)) / 1e6
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny model and short runs (CI)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for torch and onnxruntime alike (default: torch's default count)",
    )
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    ap.add_argument("--ort-worker", metavar="FOLDER", help=argparse.SUPPRESS)
    ap.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.ort_worker:  # the subprocess: never imports torch
        w = json.loads(args.worker_args)
        print(json.dumps(ort_worker(args.ort_worker, **w)))
        return 0

    import torch

    from training.export import export_model
    from training.models import ModelConfig, build_model, count_parameters

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.smoke:
        hidden, vocab, chars, repeats = 32, 20, 200, 20
    else:
        hidden, vocab, chars, repeats = 600, 50, 10_000, 300
    batches = [1, 64]
    torch.manual_seed(0)
    config = ModelConfig(kind="char", core="nlstm", hidden_size=hidden, depth=2, vocab_size=vocab)
    model = build_model(config).eval()
    params = count_parameters(model)

    with tempfile.TemporaryDirectory(prefix="nlstm-bench-") as tmp:
        from training.data.tokenizer import train_char_tokenizer

        # a tokenizer of exactly `vocab` symbols (unk + vocab - 1 characters); weights are random
        text = "".join(chr(0x4E00 + i) for i in range(vocab - 1))
        tok = train_char_tokenizer([text])
        folder = Path(tmp) / "model"
        meta = export_model(
            model, folder, task="bench", tokenizer=tok.model_proto, sequence="always"
        )
        worker_args = json.dumps(
            {"batches": batches, "chars": chars, "repeats": repeats, "threads": threads}
        )
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        proc = subprocess.run(
            [sys.executable, __file__, "--ort-worker", str(folder), "--worker-args", worker_args],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            check=False,
        )
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        ort = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not ort["torch_loaded"], "the onnxruntime worker must not import torch"
    tt = torch_side(model, batches, chars, repeats)

    print(
        f"model: NLSTM depth 2, {hidden} cells, vocabulary {vocab}: {params:,} parameters "
        "(random weights)"
    )
    print(
        f"threads: {threads} for torch {torch.__version__} and onnxruntime "
        "(CPU provider, own process)"
    )
    print(f"\none step (median of {repeats})   onnxruntime      torch eager   torch / onnxruntime")
    for b in batches:
        o, t = ort["step_us"][str(b)], tt["step_us"][str(b)]
        print(f"  batch {b:<3}              {o:>10.1f} us   {t:>10.1f} us   {t / o:>6.2f}x")
    base = ort["score_step_loop_s"]
    print(
        f"\nscore {chars:,} characters, batch 1     total     per char   vs onnxruntime step loop"
    )
    rows = [
        ("onnxruntime step graph, per char", base),
        ("onnxruntime sequence graph (Scan)", ort["score_sequence_s"]),
        ("torch eager, per char", tt["score_step_loop_s"]),
        ("torch whole sequence (fused)", tt["score_fused_s"]),
    ]
    for name, s in rows:
        print(f"  {name:<34} {s:>7.3f} s {s / chars * 1e6:>8.1f} us   {base / s:>6.2f}x")
    verdict = "faster" if ort["score_sequence_s"] < base else "not faster"
    print(
        f"\nsequence graph: {base / ort['score_sequence_s']:.2f}x the step loop ({verdict}); "
        f"export-time measurement: {meta.sequence_timing.get('speedup')}x"
    )
    if args.json:
        print(json.dumps({"params": params, "threads": threads, "onnxruntime": ort, "torch": tt}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
