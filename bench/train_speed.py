"""Training throughput: the paper's PTB NLSTM against the fused nn.LSTM 2x600 baseline, and how
close each comes to the machine's GEMM peak.

One run trains, interleaved so that machine noise hits all alike, each of

  * nn.LSTM:      torch.nn.LSTM(50, 600, num_layers=2) on one-hot inputs + linear head, the
                  fused kernel (oneDNN on the CPU, cuDNN on CUDA): the reference;
  * nlstm-fused:  CharLM with NestedLSTM(50 -> 600, depth 2), our whole-sequence Function
                  (equal parameters: 4.47M against nn.LSTM's 4.45M);
  * nlstm-ops:    the same without the C++ step kernels (training/nlstm_native.py): each step's
                  pointwise work as separate torch ops, the fallback when no compiler exists
                  (`--kinds`; CPU only);
  * nlstm-mkl:    the same with the CPU products through torch.mm (MKL), as before oneDNN
                  (`--kinds`; CPU only);
  * nlstm-graphs: the fused Function captured in CUDA graphs (CUDA only, the default there);
  * nlstm-loop:   the same model stepped cell by cell under autograd (the naive reference);

for batch 32, sequence 100: forward, cross-entropy, backward, gradient clipping, Adam. Each
round also times one large float32 product (2048^3 on the CPU through both torch.mm and oneDNN,
8192^3 on CUDA), and the best rate seen is the run's GEMM peak. It prints, per kind, chars/s,
the ratio against nn.LSTM, the GEMM FLOPs of one training step, and the rate and fraction of the
peak those FLOPs reach. On the CPU it prints the rates twice: by wall time, and by the process's
CPU time, which counts only the cycles this process got (on a machine shared with other jobs
the wall-time rates follow the neighbours; with --threads 1 the CPU time is the work itself,
with more threads it also counts the OpenMP workers' spinning). Compare ratios within one run,
not absolute numbers across runs or machines. The last line is the same figures as JSON.

    python bench/train_speed.py                            # CPU, and CUDA too when available
    python bench/train_speed.py --device cpu --threads 1 --repeats 6
    python bench/train_speed.py --smoke --device cpu       # a tiny configuration, for CI
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from training import gemm, nlstm_native
from training.models import ModelConfig, build_model

KINDS = ("nn.LSTM", "nlstm-fused", "nlstm-ops", "nlstm-mkl", "nlstm-graphs", "nlstm-loop")


def step_gflop(kind: str, batch: int, seq: int, hidden: int, vocab: int) -> float:
    """GEMM GFLOPs of one training step: the forward's products, times 3 (the backward
    multiplies each once into its input's gradient and once into its weight's). A one-hot
    input product counts when the model computes it densely (nn.LSTM gets float one-hot
    vectors); the NLSTM looks its columns up instead. Both models do the same recurrent work:
    2 x (B x 4H x H) per step for the stacked LSTM's two recurrent products plus its second
    layer's input product, 2 x B x 4H x (H + 2H) for the NLSTM's two levels."""
    n, H = batch * seq, hidden
    head = 2 * n * H * vocab
    if kind == "nn.LSTM":
        core = 2 * n * 4 * H * (vocab + H) + 2 * n * 4 * H * (H + H)
    else:
        core = 2 * n * 4 * H * H + 2 * n * 4 * H * (2 * H)
    return 3 * (core + head) / 1e9


def make_step(kind: str, vocab: int, hidden: int, device: torch.device, x, y):
    if kind == "nn.LSTM":
        core = torch.nn.LSTM(vocab, hidden, num_layers=2).to(device)
        head = torch.nn.Linear(hidden, vocab).to(device)
        params = list(core.parameters()) + list(head.parameters())

        def forward():
            out, _ = core(F.one_hot(x, vocab).float())
            return head(out)

    else:
        model = build_model(
            ModelConfig(kind="char", core="nlstm", hidden_size=hidden, depth=2, vocab_size=vocab)
        ).to(device)
        model.core.fused = kind != "nlstm-loop"
        model.core.cuda_graphs = kind == "nlstm-graphs"
        params = list(model.parameters())

        def forward():
            return model(x)[0]

    opt = torch.optim.Adam(params, lr=2e-3)
    onednn = kind != "nlstm-mkl"
    native = kind != "nlstm-ops"

    def step():
        gemm.ONEDNN = onednn
        nlstm_native.ENABLED = native
        try:
            opt.zero_grad(set_to_none=True)
            logits = forward()
            loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        finally:
            gemm.ONEDNN = True
            nlstm_native.ENABLED = True
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def peak_probes(device: torch.device, smoke: bool):
    """name -> (product, GFLOP): one large float32 product per kernel the device has."""
    n = 256 if smoke else (8192 if device.type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    probes = {"torch.mm": (lambda: torch.mm(a, b), 2 * n**3 / 1e9)}
    if device.type == "cpu" and gemm.onednn_available():
        lin = torch.ops.mkldnn._linear_pointwise
        probes["oneDNN"] = (lambda: lin(a, b, None, "none", [], ""), 2 * n**3 / 1e9)
    return probes


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - w0, time.process_time() - c0


def run(device, batch, seq, hidden, vocab, repeats, kinds, smoke=False) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (seq, batch), generator=g).to(device)
    y = torch.randint(0, vocab, (seq, batch), generator=g).to(device)
    steps = {k: make_step(k, vocab, hidden, device, x, y) for k in kinds}
    probes = peak_probes(device, smoke)
    for step in steps.values():  # warm-up: allocator, oneDNN/cuDNN plans, CUDA graph capture
        step()
        step()
    for probe, _ in probes.values():
        probe()
    wall = {k: [] for k in kinds}
    cpu = {k: [] for k in kinds}
    clocks = ["wall", "cpu"] if device.type == "cpu" else ["wall"]
    # the large product's rate by each clock: by wall time it uses every thread, by CPU time one
    peak_rates: dict[str, dict[str, list[float]]] = {c: {p: [] for p in probes} for c in clocks}
    for _ in range(repeats):  # interleaved, so drifts in machine speed hit every kind alike
        for k, step in steps.items():
            w, c = timed(step, device)
            wall[k].append(w)
            cpu[k].append(c)
        for p, (probe, gf) in probes.items():
            w, c = timed(probe, device)
            for clock, sec in (("wall", w), ("cpu", c)):
                if clock in clocks:
                    peak_rates[clock][p].append(gf / sec)
    # the peak, per clock: the best rate any kernel reached on the large product. Each kind's
    # GEMM rate is compared with the peak of the same clock (with more than one thread the
    # wall-time peak is the threads' together, the CPU-time peak about one core's).
    peaks = {clock: {p: max(v) for p, v in rates.items()} for clock, rates in peak_rates.items()}
    peak = {clock: max(by_kernel.values()) for clock, by_kernel in peaks.items()}
    main_clock = clocks[-1]  # CPU time on the CPU, wall time on CUDA
    peak_by_kernel = peaks[main_clock]
    chars = batch * seq
    result = {
        "device": device.type,
        "batch": batch,
        "seq": seq,
        "hidden": hidden,
        "vocab": vocab,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "peak_gflops": peak[main_clock],
        "peak_by_kernel": peak_by_kernel,
        "peak_gflops_by_clock": peak,
        "kinds": {},
    }
    for k in kinds:
        gf = step_gflop(k, batch, seq, hidden, vocab)
        r = {"gflop_per_step": gf}
        for clock, times in (("wall", wall[k]), ("cpu", cpu[k])):
            if clock in clocks:
                sec = statistics.median(times)
                r[f"{clock}_chars_per_s"] = chars / sec
                r[f"{clock}_gflops"] = gf / sec
                r[f"{clock}_peak_fraction"] = gf / sec / peak[clock]
        result["kinds"][k] = r
    base = result["kinds"].get("nn.LSTM")
    for r in result["kinds"].values():
        for clock in clocks:
            r[f"{clock}_ratio"] = (
                r[f"{clock}_chars_per_s"] / base[f"{clock}_chars_per_s"] if base else None
            )

    print(
        f"\n{device.type}: batch {batch}, sequence {seq}, hidden {hidden}, vocab {vocab}, "
        f"{result['threads']} threads, median of {repeats} interleaved steps"
    )
    for clock, by_kernel in peaks.items():
        print(
            "large-GEMM peak this run: "
            + ", ".join(f"{p} {v:,.0f}" for p, v in by_kernel.items())
            + f" GFLOP/s{' (by CPU time)' if clock == 'cpu' else ' (by wall time)'}"
        )
    for clock in clocks:
        label = "wall time" if clock == "wall" else "CPU time of this process"
        print(f"  by {label}:")
        for k in kinds:
            r = result["kinds"][k]
            ratio = r[f"{clock}_ratio"]
            print(
                f"    {k:<13} {r[f'{clock}_chars_per_s']:>9,.0f} chars/s   "
                f"ratio vs nn.LSTM {'-' if ratio is None else f'{ratio:.2f}'}   "
                f"{r['gflop_per_step']:.1f} GFLOP/step at {r[f'{clock}_gflops']:,.0f} GFLOP/s = "
                f"{r[f'{clock}_peak_fraction']:.0%} of peak"
            )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=600)
    ap.add_argument("--vocab", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS,
        default=None,
        help="what to train (default: nn.LSTM, nlstm-fused, nlstm-loop; "
        "on CUDA also nlstm-graphs); nn.LSTM is the ratios' reference",
    )
    ap.add_argument("--no-loop", action="store_true", help="skip the slow naive cell loop")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps (CI)")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.seq, args.hidden, args.repeats = 4, 10, 32, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all"):
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        elif args.device == "cuda":
            ap.error("--device cuda: torch sees no CUDA device here")
    if torch.device("cpu") in devices:
        print(nlstm_native.status())  # the fused path's C++ step kernels, or why not
    results = []
    for device in devices:
        kinds = list(args.kinds or ["nn.LSTM", "nlstm-fused", "nlstm-graphs", "nlstm-loop"])
        if args.no_loop and "nlstm-loop" in kinds:
            kinds.remove("nlstm-loop")
        wrong = {"cpu": "nlstm-graphs", "cuda": "nlstm-mkl"}[device.type]
        if wrong in kinds:
            if args.kinds:
                ap.error(f"{wrong} runs only on {'CUDA' if wrong == 'nlstm-graphs' else 'the CPU'}")
            kinds.remove(wrong)
        results.append(
            run(
                device,
                args.batch,
                args.seq,
                args.hidden,
                args.vocab,
                args.repeats,
                kinds,
                smoke=args.smoke,
            )
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
