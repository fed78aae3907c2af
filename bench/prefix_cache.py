"""Time to the first character with and without the prefix-state cache, against two real
`nlstm serve` processes in one run.

Both servers run the same model, one with `--prefix-cache-mb 0` (no cache), one with the
default cache. Each round sends both the same request, a shared `--prompt-chars`-character
prompt (the README's text) and `--max-chars` characters to generate with the round's seed,
alternating which server goes first, and times each call from the request to its first
character (the client's view: the whole prefill, then one sample). The cached server's first
call with the prompt fills its cache and is reported apart ("cold"). Then the same with the
shared prompt followed by a different 20-character ending per round (a shared instruction,
then each user's question): the cached server starts at the shared prompt's end and feeds
the ending. Every pair of calls must give the same text: the cache changes only the time.

    python bench/prefix_cache.py               # the bundled ptb-nlstm, 2,000 characters, 10 rounds
    python bench/prefix_cache.py --smoke       # 200 characters, 2 rounds (CI)

The figure is the median over the rounds of each server, and their ratio (the issue's goal:
the cached time at least 20x lower for the 2,000-character prompt). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _server import REPO, readme_lines

from serving.testing.process import Server

GOAL = 20.0  # the uncached over the cached time to the first character, 2,000-character prompt


def first_char(stub, model: str, prompt: str, max_chars: int, seed: int) -> tuple[float, str]:
    """(seconds from the request to the first character, the whole text) of one Generate."""
    from serving.api.nlstm.v1 import inference_pb2 as pb

    req = pb.GenerateRequest(
        model=model, prompt=prompt, max_chars=max_chars, temperature=1.0, seed=seed
    )
    t0 = time.perf_counter()
    first, text = None, []
    for r in stub.Generate(req):
        if r.text and first is None:
            first = time.perf_counter() - t0
        text.append(r.text)
    if first is None:
        raise RuntimeError(f"Generate sent no characters for seed {seed}")
    return first, "".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", type=Path, default=REPO / "exported", help="exported models folder")
    ap.add_argument("--model", default="ptb-nlstm")
    ap.add_argument("--prompt-chars", type=int, default=2000, help="length of the shared prompt")
    ap.add_argument("--max-chars", type=int, default=50, help="characters each call generates")
    ap.add_argument("--rounds", type=int, default=10, help="timed calls per server and prompt kind")
    ap.add_argument("--smoke", action="store_true", help="a 200-character prompt, 2 rounds")
    args = ap.parse_args()
    if args.smoke:
        args.prompt_chars, args.rounds = 200, 2
    if args.rounds < 1 or args.prompt_chars < 1 or args.max_chars < 1:
        ap.error("--rounds, --prompt-chars and --max-chars must be >= 1")
    import grpc

    from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc

    text = "\n".join(readme_lines()).lower()
    while len(text) < args.prompt_chars + 20 * args.rounds:
        text += "\n" + text
    prompt = text[: args.prompt_chars]
    endings = [
        text[args.prompt_chars + 20 * i : args.prompt_chars + 20 * (i + 1)]
        for i in range(args.rounds)
    ]
    print(
        f"model {args.model} from {args.models}; a {len(prompt):,}-character prompt, "
        f"{args.max_chars} characters generated, {args.rounds} rounds",
        flush=True,
    )
    with Server(args.models, "--prefix-cache-mb", "0") as off, Server(args.models) as on:
        channels = {name: grpc.insecure_channel(s.target) for name, s in (("off", off), ("on", on))}
        stubs = {name: pb_grpc.InferenceStub(c) for name, c in channels.items()}
        for (
            stub
        ) in stubs.values():  # load and warm both (a prompt of its own: nothing of the one timed)
            first_char(stub, args.model, "warm up", 5, 0)
        cold, cold_text = first_char(stubs["on"], args.model, prompt, args.max_chars, 0)
        if cold_text != first_char(stubs["off"], args.model, prompt, args.max_chars, 0)[1]:
            raise SystemExit("the cached server's text differs from the uncached one's (seed 0)")
        times: dict[str, dict[str, list[float]]] = {
            k: {"off": [], "on": []} for k in ("same", "ending")
        }
        for kind in ("same", "ending"):
            for i in range(args.rounds):
                p = prompt if kind == "same" else prompt + endings[i]
                order = ("off", "on") if i % 2 == 0 else ("on", "off")
                texts = {}
                for name in order:
                    seconds, texts[name] = first_char(
                        stubs[name], args.model, p, args.max_chars, i + 1
                    )
                    times[kind][name].append(seconds)
                if texts["on"] != texts["off"]:
                    raise SystemExit(
                        f"the cached server's text differs from the uncached one's ({kind}, seed "
                        f"{i + 1})"
                    )
        counts = {
            n: on.metric(f"nlstm_prefix_cache_{n}_total", model=args.model)
            for n in ("hits", "misses", "skipped_chars")
        }
        held = on.metric("nlstm_prefix_cache_bytes", model=args.model)
        for c in channels.values():
            c.close()
        off.stop()
        on.stop()
    results = {}
    for kind, label in (
        ("same", "the same prompt"),
        ("ending", "the prompt + a different 20-char ending"),
    ):
        off_ms = statistics.median(times[kind]["off"]) * 1e3
        on_ms = statistics.median(times[kind]["on"]) * 1e3
        results[kind] = {
            "off_ms": off_ms,
            "on_ms": on_ms,
            "ratio": off_ms / on_ms,
            "off_all_ms": [t * 1e3 for t in times[kind]["off"]],
            "on_all_ms": [t * 1e3 for t in times[kind]["on"]],
        }
        print(
            f"{label:<42} time to the first character: without the cache {off_ms:8.1f} ms, "
            f"with it {on_ms:7.2f} ms, ratio {off_ms / on_ms:6.1f}",
            flush=True,
        )
    goal_applies = args.prompt_chars >= 2000
    met = results["same"]["ratio"] >= GOAL
    print(
        f"cold (the call that filled the cache): {cold * 1e3:.1f} ms; cache: {counts['hits']:.0f} "
        f"hits, {counts['misses']:.0f} misses, {counts['skipped_chars']:,.0f} prompt characters "
        f"skipped, {held / 2**20:.2f} MiB held"
        + (f"; goal {GOAL:g}x: {'met' if met else 'NOT met'}" if goal_applies else ""),
        flush=True,
    )
    print(
        json.dumps(
            {
                "model": args.model,
                "prompt_chars": len(prompt),
                "max_chars": args.max_chars,
                "rounds": args.rounds,
                "cold_ms": cold * 1e3,
                "results": results,
                "cache": counts,
                "cache_bytes": held,
                "identical": True,
                "goal": GOAL if goal_applies else None,
                "goal_met": met if goal_applies else None,
            }
        )
    )


if __name__ == "__main__":
    main()
