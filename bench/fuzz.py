"""Fuzzing a real `nlstm serve` process: thousands of random and malformed requests to every rpc,
drawn by hypothesis from the strategies of serving/testing/fuzz_requests.py and judged by the
checker of serving/testing/fuzz_oracle.py (the same ones tests/test_fuzz.py runs a bounded number
of against an in-process server).

Prints a table: per rpc the requests sent, the status codes they got, how many were INTERNAL or
UNKNOWN and how many broke the documented contract in any way (a code docs/serving.md does not
give for that request, a wrong answer, a session left unusable), whether the server process is
still alive after them, whether known-good requests (checked every --check-every requests
and at the end) still get the answers they got at the start, and the server's resident memory
after them; then the same as one JSON line. Exits 1 on any of these, if the server logged an
error, or if its RSS grew by more than --max-rss-growth-mib over the run.

    python bench/fuzz.py --tiny                     # tiny random models, 5000 requests per rpc
    python bench/fuzz.py --examples 20000 --seed 7  # the bundled models of exported/
    python bench/fuzz.py --smoke                    # a few requests per rpc (CI)

The server runs with small limits (--max-chars 64, --max-text 512, --max-sessions 16) so that
random sizes reach them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
from _server import REPO

from serving.limits import Limits
from serving.testing.fuzz import RPCS, Fuzzer, Outcome, fuzz
from serving.testing.process import Server
from training.testing.models import export_tiny_models

LIMITS = Limits(max_chars=64, max_text=512, max_sessions=16)
FLAGS = (
    "--max-chars",
    str(LIMITS.max_chars),
    "--max-text",
    str(LIMITS.max_text),
    "--max-sessions",
    str(LIMITS.max_sessions),
)
CODES = ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED")


class Tally:
    """One rpc's results: codes, problems (each kind once, with its count), good checks."""

    def __init__(self, fuzzer: Fuzzer, check_every: int) -> None:
        self.fuzzer, self.check_every = fuzzer, check_every
        self.codes: Counter[str] = Counter()
        self.problems: Counter[str] = Counter()
        self.bad_checks = 0
        self.alive = True
        self.rss_mib = 0.0  # the server's RSS after this rpc's requests

    def __call__(self, outcome: Outcome) -> None:
        self.codes[outcome.code] += 1
        if outcome.problem:
            self.problems[outcome.problem[:200]] += 1
        if sum(self.codes.values()) % self.check_every == 0:
            self.check()

    def check(self) -> None:
        changed = self.fuzzer.still_good()
        if changed:
            self.bad_checks += 1
            self.problems[changed[:200]] += 1

    @property
    def internal(self) -> int:
        return self.codes["INTERNAL"] + self.codes["UNKNOWN"]


def run(
    models: Path, rpcs: list[str], examples: int, seed: int, check_every: int, max_rss_growth: float
) -> bool:
    with Server(models, *FLAGS, metrics=False) as server:
        channel = grpc.insecure_channel(server.target)
        fuzzer = Fuzzer(channel, LIMITS)
        rss0 = server.rss_mib()
        print(
            f"fuzzing {', '.join(f'{n} ({k})' for n, k in sorted(fuzzer.target.models.items()))} "
            f"on port {server.port}: {examples} requests per rpc, seed {seed}",
            flush=True,
        )
        tallies: dict[str, Tally] = {}
        for rpc in rpcs:
            t0 = time.perf_counter()
            tally = tallies[rpc] = Tally(fuzzer, check_every)
            fuzz(fuzzer, rpc, examples, tally, seed)
            tally.check()
            tally.alive = server.proc.poll() is None
            if not tally.alive:
                break
            tally.rss_mib = server.rss_mib()
            print(
                f"  {rpc}: {sum(tally.codes.values())} requests in "
                f"{time.perf_counter() - t0:.0f} s, RSS {tally.rss_mib:.0f} MiB",
                flush=True,
            )
        channel.close()
        errors = server.errors()
    others = sorted(
        {c for t in tallies.values() for c in t.codes} - set(CODES) - {"INTERNAL", "UNKNOWN"}
    )
    columns = [*CODES, *others]
    head = [
        "rpc",
        "sent",
        *columns,
        "INTERNAL/UNKNOWN",
        "contract broken",
        "alive",
        "good after",
        "RSS MiB",
    ]
    rows = [
        [
            rpc,
            sum(t.codes.values()),
            *(t.codes[c] for c in columns),
            t.internal,
            sum(t.problems.values()),
            "yes" if t.alive else "NO",
            "yes" if not t.bad_checks else f"NO ({t.bad_checks} checks)",
            f"{t.rss_mib:.0f}",
        ]
        for rpc, t in tallies.items()
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    print()
    for row in (head, *rows):
        print(
            "  ".join(
                str(x).rjust(w) if i else str(x).ljust(w)
                for i, (x, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    problems = Counter()
    for t in tallies.values():
        problems.update(t.problems)
    for problem, n in problems.most_common(20):
        print(f"{n:>6} x {problem}")
    print(f"server log: {len(errors)} error lines" + "".join(f"\n  {line}" for line in errors[:20]))
    growth = max((t.rss_mib for t in tallies.values()), default=rss0) - rss0
    print(
        f"server RSS: {rss0:.0f} MiB at the start, grew by at most {growth:.0f} MiB "
        f"(bound {max_rss_growth:g})"
    )
    passed = (
        not problems
        and not errors
        and len(tallies) == len(rpcs)
        and all(t.alive for t in tallies.values())
        and growth <= max_rss_growth
    )
    print(
        json.dumps(
            {
                "fuzz": {
                    rpc: {
                        "sent": sum(t.codes.values()),
                        "codes": dict(t.codes),
                        "internal": t.internal,
                        "broken": sum(t.problems.values()),
                        "alive": t.alive,
                        "good_after": not t.bad_checks,
                        "rss_mib": round(t.rss_mib, 1),
                    }
                    for rpc, t in tallies.items()
                },
                "rss_start_mib": round(rss0, 1),
                "rss_growth_mib": round(growth, 1),
                "log_errors": errors,
                "passed": passed,
            }
        )
    )
    return passed


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--models",
        type=Path,
        default=REPO / "exported",
        help="exported models folder (default: exported/)",
    )
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random models exported to a temporary folder instead",
    )
    ap.add_argument("--examples", type=int, default=5000, help="requests per rpc")
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="hypothesis's seed: the same seed sends the same requests",
    )
    ap.add_argument(
        "--check-every",
        type=int,
        default=10,
        help="requests between two checks of the good requests",
    )
    ap.add_argument("--rpcs", nargs="+", choices=RPCS, default=list(RPCS))
    ap.add_argument("--smoke", action="store_true", help="10 requests per rpc")
    ap.add_argument(
        "--max-rss-growth-mib",
        type=float,
        default=64.0,
        help="most the server's RSS may grow over the run (default 64 MiB)",
    )
    args = ap.parse_args()
    if args.smoke:
        args.examples = 10
    if not args.tiny:
        return (
            0
            if run(
                args.models,
                args.rpcs,
                args.examples,
                args.seed,
                args.check_every,
                args.max_rss_growth_mib,
            )
            else 1
        )
    with tempfile.TemporaryDirectory(prefix="nlstm-fuzz-") as tmp:
        models = export_tiny_models(Path(tmp))
        return (
            0
            if run(
                models,
                args.rpcs,
                args.examples,
                args.seed,
                args.check_every,
                args.max_rss_growth_mib,
            )
            else 1
        )


if __name__ == "__main__":
    sys.exit(main())
