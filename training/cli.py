"""The `nlstm` command: the one place where flags are parsed.

Every subcommand imports its implementation lazily inside its handler, so that `nlstm serve`
(and the other serving clients) run in a process that never loads torch: onnxruntime shares the
CPU badly with torch's thread pools, and the serving image does not carry torch at all.
Everything below this module takes plain arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


# --------------------------------------------------------------------------------------- params
def _add_params(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "params",
        help="print the parameter counts of every model in the paper's Tables 1-4",
        description=(
            "Instantiate every model of the paper's Tables 1-4 and print task, model, n, cell "
            "size and trainable parameters beside the paper's Params column."
        ),
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per row instead of a table")
    p.add_argument(
        "--poems-vocab",
        type=int,
        default=None,
        help="vocabulary size of the poems task (default: 5367, what the paper's counts imply)",
    )
    p.set_defaults(handler=_run_params)


def _run_params(args: argparse.Namespace) -> int:
    import json

    from training.paper import PAPER_POEMS_VOCAB, paper_rows

    rows = paper_rows(poems_vocab=args.poems_vocab or PAPER_POEMS_VOCAB)
    if args.json:
        for r in rows:
            print(json.dumps(r.as_dict()))
        return 0
    header = f"{'task':<8} {'model':<6} {'n':>2} {'cell':>5} {'params':>12} {'paper':>7}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.task:<8} {r.model:<6} {r.n:>2} {r.cell_size:>5} {r.params:>12,} "
            f"{r.paper_params:>7}  {r.note}"
        )
    return 0


# ----------------------------------------------------------------------------------------- data
def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="download, verify and prepare the paper's datasets")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="{prepare,download}")
    for name, help_ in (
        ("prepare", "download (if missing), verify, tokenize and cache a task's data"),
        ("download", "download and verify a task's raw files only"),
    ):
        q = dsub.add_parser(name, help=help_)
        q.add_argument("task", help="ptb, text8, poems or mnist")
        q.add_argument(
            "--data-dir",
            type=Path,
            default=None,
            help=(
                "where the raw files live, as DIR/TASK/FILE; may be read-only when complete "
                "(default: $NLSTM_DATA_DIR, else ~/.cache/nlstm/raw)"
            ),
        )
        if name == "prepare":
            q.add_argument(
                "--cache-dir",
                type=Path,
                default=None,
                help=(
                    "where prepared (tokenized, memory-mapped) data is cached "
                    "(default: $NLSTM_CACHE_DIR, else ~/.cache/nlstm/prepared)"
                ),
            )
            q.add_argument("--force", action="store_true", help="prepare again even if a cache exists")
    p.set_defaults(handler=_run_data)


def _run_data(args: argparse.Namespace) -> int:
    from training import data

    if args.data_command == "download":
        paths = data.download(args.task, data_dir=args.data_dir)
        for path in paths:
            print(path)
        return 0
    summary = data.prepare(
        args.task, data_dir=args.data_dir, force=args.force, cache_dir=args.cache_dir
    )
    print(summary)
    return 0


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nlstm",
        description="Nested LSTMs and their baselines: train, export and serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_params(sub)
    _add_data(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as exc:
        # Expected, user-facing failures (bad input, missing files, checksum mismatch, offline
        # download): one clear line, no traceback. Anything else is a bug and keeps its traceback.
        print(f"nlstm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
