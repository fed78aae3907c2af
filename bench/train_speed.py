"""Training throughput: the paper's PTB NLSTM against the fused nn.LSTM 2x600 baseline.

One run trains, interleaved so that machine noise hits both alike, each of

  * nlstm-fused:  CharLM with NestedLSTM(50 -> 600, depth 2), our whole-sequence Function;
  * nlstm-loop:   the same model stepped cell by cell under autograd (the naive reference);
  * nn.LSTM:      torch.nn.LSTM(50, 600, num_layers=2) on one-hot inputs + linear head, the
                  fused kernel (oneDNN on the CPU, cuDNN on CUDA): the reference;

for batch 32, sequence 100: forward, cross-entropy, backward, Adam. It prints chars/s for
each and the ratios against nn.LSTM measured in this same run. Compare ratios, not absolute
numbers across runs or machines.

    python bench/train_speed.py                  # CPU, and CUDA too when available
    python bench/train_speed.py --smoke          # a tiny configuration, for CI
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from training.models import ModelConfig, build_model


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
        model.core.fused = kind == "nlstm-fused"
        params = list(model.parameters())

        def forward():
            return model(x)[0]

    opt = torch.optim.Adam(params, lr=2e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = forward()
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def run(device: torch.device, batch: int, seq: int, hidden: int, vocab: int, repeats: int, kinds):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (seq, batch), generator=g).to(device)
    y = torch.randint(0, vocab, (seq, batch), generator=g).to(device)
    steps = {k: make_step(k, vocab, hidden, device, x, y) for k in kinds}
    for step in steps.values():  # warm-up: allocator, oneDNN/cuDNN plans
        step()
        step()
    times = {k: [] for k in kinds}
    for _ in range(repeats):  # interleaved, so drifts in machine speed hit every kind alike
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t0)
    chars = batch * seq
    rate = {k: chars / statistics.median(v) for k, v in times.items()}
    print(f"\n{device.type}: batch {batch}, sequence {seq}, hidden {hidden}, vocab {vocab}, "
          f"median of {repeats} steps (threads: {torch.get_num_threads()})")
    for k in kinds:
        print(f"  {k:<12} {rate[k]:>10,.0f} chars/s   ratio vs nn.LSTM {rate[k] / rate['nn.LSTM']:.2f}")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=600)
    ap.add_argument("--vocab", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--no-loop", action="store_true", help="skip the slow naive cell loop")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps (CI)")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.seq, args.hidden, args.repeats = 4, 10, 32, 2
    kinds = ["nn.LSTM", "nlstm-fused"] + ([] if args.no_loop else ["nlstm-loop"])
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    for device in devices:
        run(device, args.batch, args.seq, args.hidden, args.vocab, args.repeats, kinds)


if __name__ == "__main__":
    main()
