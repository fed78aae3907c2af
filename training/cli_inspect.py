"""The `nlstm` commands that look at models and runs (the parser is built in training/cli.py):
`params` (the paper's parameter counts), `plot` (learning curves), `summary` (a results table
over runs and seeds) and `visualize` (cell activations over a text). Each handler imports its
implementation lazily.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


# --------------------------------------------------------------------------------------- params
def add_params(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "params",
        help="print the parameter counts of every model in the paper's Tables 1-4 and the HM-LSTM",
        description=(
            "Instantiate every model of the paper's Tables 1-4 and the HM-LSTM baseline's PTB "
            "model (3x500) and print task, model, n, cell size and trainable parameters beside "
            "the paper's Params column ('-' where the paper gives none)."
        ),
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object per row instead of a table"
    )
    p.add_argument(
        "--poems-vocab",
        type=int,
        default=None,
        help="vocabulary size of the poems task (default: 5367, what the paper's counts imply)",
    )
    p.set_defaults(handler=_run_params, needs=("torch",))


def _run_params(args: argparse.Namespace) -> int:
    import json

    from training.paper import PAPER_POEMS_VOCAB, paper_rows

    rows = paper_rows(poems_vocab=args.poems_vocab or PAPER_POEMS_VOCAB)
    if args.json:
        for r in rows:
            print(json.dumps(r.as_dict()))
        return 0
    header = f"{'task':<8} {'model':<7} {'n':>2} {'cell':>5} {'params':>12} {'paper':>7}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.task:<8} {r.model:<7} {r.n:>2} {r.cell_size:>5} {r.params:>12,} "
            f"{r.paper_params or '-':>7}  {r.note}"
        )
    return 0


# ----------------------------------------------------------------------------------------- plot
def add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="draw learning curves of one or more runs (the paper's Figures 5-8)",
        description=(
            "Draw the figures of each RUN's metrics.jsonl per epoch, several runs on one chart "
            "(PNG). Default splits are the paper's: valid and test for PTB, train and valid "
            "otherwise; MNIST gets NLL and error panels."
        ),
    )
    p.add_argument(
        "runs", nargs="+", type=Path, metavar="RUN", help="run folder (or its metrics.jsonl)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="PNG to write (default: FIRST_RUN/curves.png)"
    )
    p.add_argument(
        "--splits",
        default=None,
        help="comma-separated splits to draw, from train, valid, test (default: the paper's)",
    )
    p.add_argument("--title", default=None, help="chart title (default: the task)")
    p.set_defaults(handler=_run_plot, needs=("torch", "matplotlib"))


def _run_plot(args: argparse.Namespace) -> int:
    from training.plots import plot_runs

    splits = args.splits.split(",") if args.splits else None
    out = plot_runs(args.runs, out=args.out, splits=splits, title=args.title)
    print(out)
    return 0


# -------------------------------------------------------------------------------------- summary
def add_summary(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "summary",
        help="a results table (markdown) of one or more runs, mean and spread over seeds",
        description=(
            "Print each RUN's figures at its best validation (the test figure at that "
            "evaluation, as the paper reports) as a markdown table. Runs whose folder names "
            "differ only by a trailing -sN / -seedN are one row: mean and sample standard "
            "deviation over the seeds. Every RUN must be of the same task; a run that has not "
            "evaluated yet is left out, with a line on stderr."
        ),
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folder")
    p.set_defaults(handler=_run_summary)


def _run_summary(args: argparse.Namespace) -> int:
    from training.summary import NoEvaluationYet, SummaryError, group, markdown, read_run

    runs = []
    for run in args.runs:  # a run that has not evaluated yet is left out (a queue in progress)
        try:
            runs.append(read_run(run))
        except NoEvaluationYet as exc:
            print(f"nlstm summary: left out {run}: {exc}", file=sys.stderr)
    if not runs:
        raise SummaryError("none of the runs given has an evaluation yet")
    print(markdown(group(runs)), end="")
    return 0


# ------------------------------------------------------------------------------------ visualize
def add_visualize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "visualize",
        help="draw the cell activations of a trained model over a text (the paper's Figures 3-4)",
        description=(
            "Feed TEXT through a character model one character at a time and draw, per "
            "character, the first cells of every memory: for an NLSTM the inner memory "
            "tanh(c~) beside the outer memory c, for a stacked LSTM every layer's tanh(c). "
            "Writes cells.png and a self-contained cells.html."
        ),
    )
    p.add_argument("checkpoint", type=Path, help="a checkpoint (best.pt or last.pt of a run)")
    p.add_argument(
        "--text", required=True, help="the text to feed, e.g. a sentence of the test set"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="folder for the files (default: the checkpoint's)"
    )
    p.add_argument(
        "--cells", type=int, default=7, help="how many cells to draw per memory (default 7)"
    )
    p.set_defaults(handler=_run_visualize, needs=("torch", "matplotlib"))


def _run_visualize(args: argparse.Namespace) -> int:
    from training.plots import visualize_checkpoint

    out = args.out if args.out is not None else args.checkpoint.resolve().parent
    for path in visualize_checkpoint(args.checkpoint, args.text, out, cells=args.cells):
        print(path)
        if path.name == "operations.txt":  # HM-LSTM: UPDATE / COPY / FLUSH per layer
            print(path.read_text(encoding="utf-8"), end="")
    return 0
