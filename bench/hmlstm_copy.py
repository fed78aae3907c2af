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
ones to report (docs/results.md): give it real text with --text-file, encoded with the
checkpoint's tokenizer and cut into --batch rows of at most --steps characters (without
--text-file a checkpoint reads random ids, whose boundaries say little).
"""

from __future__ import annotations

import argparse
import time

import torch

from training.models import ModelConfig, build_model


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", default=None, help="a trained HM-LSTM char model (best.pt)")
    ap.add_argument(
        "--text-file",
        default=None,
        help="UTF-8 text to read, encoded with the checkpoint's tokenizer (needs --checkpoint)",
    )
    ap.add_argument("--hidden", type=int, default=500, help="cells per layer of the random model")
    ap.add_argument("--steps", type=int, default=400, help="characters per sequence (at most)")
    ap.add_argument("--batch", type=int, default=1, help="sequences read together")
    ap.add_argument(
        "--boundary-bias",
        type=float,
        default=0.0,
        help="random model: added to each detector's bias",
    )
    ap.add_argument(
        "--smoke", action="store_true", help="a 16-cell random model (or the checkpoint), 40 steps"
    )
    args = ap.parse_args()
    if args.text_file and not args.checkpoint:
        ap.error("--text-file needs --checkpoint: the random model has no tokenizer to encode it")
    if args.steps < 1 or args.batch < 1:
        ap.error(f"--steps and --batch must be >= 1, got {args.steps} and {args.batch}")
    if args.smoke:
        args.hidden, args.steps = 16, 40
    torch.manual_seed(0)
    tokens = None
    if args.checkpoint:
        from training.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint)
        if ckpt.model_config.core != "hmlstm" or ckpt.model_config.kind != "char":
            mc = ckpt.model_config
            ap.error(
                f"{args.checkpoint} is a {mc.kind} {mc.core} model; "
                "this benchmark reads HM-LSTM character models"
            )
        model = ckpt.build_model()
        if args.text_file:
            tokens = text_tokens(ap, ckpt.tokenizer, args.text_file, args.steps, args.batch)
    else:
        model = build_model(
            ModelConfig(
                kind="char",
                core="hmlstm",
                hidden_size=args.hidden,
                num_layers=3,
                vocab_size=50,
                embedding_size=args.hidden,
            )
        )
        with torch.no_grad():
            for n in range(model.core.num_layers - 1):
                getattr(model.core, f"bias_l{n}")[4 * args.hidden] = args.boundary_bias
    core = model.core.eval()
    if tokens is None:
        tokens = torch.randint(0, model.config.vocab_size, (args.steps, args.batch))
    steps = tokens.shape[0]
    results = {}
    with torch.no_grad():
        for skip in (False, True, False, True):  # interleaved: noise hits both alike
            core.skip_copy = skip
            t0 = time.perf_counter()
            out, _, _, counts = core(tokens, return_boundaries=True)
            results.setdefault(skip, []).append(time.perf_counter() - t0)
            results[("out", skip)] = out
            results[("counts", skip)] = counts
    assert torch.equal(results[("out", True)], results[("out", False)]), (
        "skipping changed the output"
    )
    counts = results[("counts", True)]
    source = args.text_file or "random ids"
    print(
        f"HM-LSTM {core.num_layers}x{core.hidden_size}, batch {args.batch}, {steps} steps, "
        f"input: {source}"
    )
    for n, c in enumerate(counts):
        total = sum(c.values())
        print(
            f"  layer {n}: UPDATE {c['update']:>6}  COPY {c['copy']:>6}  FLUSH {c['flush']:>6}  "
            f"(COPY {c['copy'] / total:.0%})"
        )
    t_mask, t_skip = min(results[False]), min(results[True])
    print(
        f"  masked (no skipping): {t_mask * 1e3:8.1f} ms   skipping whole-batch COPY: "
        f"{t_skip * 1e3:8.1f} ms   saved {1 - t_skip / t_mask:.0%}"
    )


def text_tokens(
    ap: argparse.ArgumentParser, tokenizer: bytes | None, path: str, steps: int, batch: int
) -> torch.Tensor:
    """The text's ids as (T, B): `batch` consecutive rows of T = min(steps, len // batch) ids."""
    from serving.formats import Tokenizer

    if tokenizer is None:
        ap.error("the checkpoint has no tokenizer: --text-file cannot be encoded")
    with open(path, encoding="utf-8") as f:
        enc = Tokenizer.from_bytes(tokenizer).encode(f.read())
    T = min(steps, len(enc.ids) // batch)
    if T < 1:
        ap.error(f"{path} has {len(enc.ids)} characters: fewer than --batch {batch}")
    if enc.unknown_chars:
        print(
            f"{path}: {enc.unknown_chars} characters outside the checkpoint's vocabulary "
            "(read as the unknown symbol)"
        )
    ids = torch.as_tensor(enc.ids[: T * batch].astype("int64"))
    return ids.view(batch, T).t().contiguous()  # row b reads characters b*T .. (b+1)*T - 1


if __name__ == "__main__":
    main()
