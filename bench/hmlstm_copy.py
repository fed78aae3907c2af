"""HM-LSTM inference: what skipping whole-batch COPY steps saves.

COPY is the HM-LSTM's promised saving: a layer that copies computes nothing. The model skips a
layer's products at a step where every sequence of the batch copies (`skip_copy`); masking
every branch (what a known PyTorch implementation does) saves nothing. This script runs the
same text through the same model with skipping on and off, in one run, and prints the
UPDATE / COPY / FLUSH counts per layer and both times.

    python bench/hmlstm_copy.py                       # the paper's PTB size, random weights
    python bench/hmlstm_copy.py --checkpoint RUN/best.pt --text-file ptb.valid.txt
    python bench/hmlstm_copy.py --smoke

With random weights the boundaries are whatever the weights make them; --boundary-bias shifts
each detector (negative: fewer boundaries, more COPY above). A trained model's figures are the
ones to report (docs/results.md).
"""

from __future__ import annotations

import argparse
import time

import torch

from training.models import ModelConfig, build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--hidden", type=int, default=500)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--boundary-bias", type=float, default=0.0)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.hidden, args.steps = 16, 40
    torch.manual_seed(0)
    if args.checkpoint:
        from training.checkpoint import load_checkpoint

        model = load_checkpoint(args.checkpoint).build_model()
    else:
        model = build_model(ModelConfig(kind="char", core="hmlstm", hidden_size=args.hidden, num_layers=3,
                                        vocab_size=50, embedding_size=args.hidden))
        with torch.no_grad():
            for n in range(model.core.num_layers - 1):
                getattr(model.core, f"bias_l{n}")[4 * args.hidden] = args.boundary_bias
    core = model.core.eval()
    V = model.config.vocab_size
    tokens = torch.randint(0, V, (args.steps, args.batch))
    results = {}
    with torch.no_grad():
        for skip in (False, True, False, True):  # interleaved: noise hits both alike
            core.skip_copy = skip
            t0 = time.perf_counter()
            out, _, z, counts = core(tokens, return_boundaries=True)
            results.setdefault(skip, []).append(time.perf_counter() - t0)
            results[("out", skip)] = out
            results[("counts", skip)] = counts
    assert torch.equal(results[("out", True)], results[("out", False)]), "skipping changed the output"
    counts = results[("counts", True)]
    print(f"HM-LSTM 3x{core.hidden_size}, batch {args.batch}, {args.steps} steps")
    for n, c in enumerate(counts):
        total = sum(c.values())
        print(f"  layer {n}: UPDATE {c['update']:>6}  COPY {c['copy']:>6}  FLUSH {c['flush']:>6}  "
              f"(COPY {c['copy'] / total:.0%})")
    t_mask, t_skip = min(results[False]), min(results[True])
    print(f"  masked (no skipping): {t_mask * 1e3:8.1f} ms   skipping whole-batch COPY: {t_skip * 1e3:8.1f} ms   "
          f"saved {1 - t_skip / t_mask:.0%}")


if __name__ == "__main__":
    main()
