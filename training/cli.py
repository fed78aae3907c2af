"""The `nlstm` command: the one place where flags are parsed. Its training side lives here
(train, export, quantize, params, plot, summary, visualize, data), its serving side in
serving/cli.py (serve, generate, score, classify, session). This module builds the parser and
dispatches; the training commands' flags and handlers live by concept in cli_train.py (data,
train), cli_export.py (export, quantize) and cli_inspect.py (params, plot, summary, visualize).

`main` dispatches lazily: a serving command's arguments go to serving.cli.main before anything
of this side is built, so that `nlstm serve` (and the serving clients) run in a process that
never loads torch: onnxruntime shares the CPU badly with torch's thread pools, and neither the
serving image nor the base install (`pip install nlstm`) carries torch at all. Every subcommand
here imports its implementation lazily inside its handler too; the commands that need torch
(train, export, params, plot, visualize: the `train` extra) name the modules they need
(`needs`), and `main` says what to install when one is missing instead of failing with an
import traceback. The entry point is here, not in serving/, because serving never imports
training. Everything below this module takes plain arguments.
"""

from __future__ import annotations

import argparse
import sys

from serving import cli as serving_cli
from training import cli_export, cli_inspect, cli_train

# What to do when a command of the `train` extra runs in the base (serving) install.
TRAIN_EXTRA_HINT = (
    "install the training extra: pip install 'nlstm[train]' (in a checkout: pip install -e "
    "'.[train]'); on a machine without a GPU install the CPU build of torch first, or pip "
    "fetches the multi-GB CUDA one: pip install torch --index-url https://download.pytorch.org/whl/cpu"
)
TRAIN_EXTRA_MODULES = ("torch", "onnx", "onnxscript", "matplotlib")


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nlstm",
        description="Nested LSTMs and their baselines: train, export and serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # in the order `nlstm --help` lists them
    cli_inspect.add_params(sub)
    cli_export.add_export(sub)
    cli_export.add_quantize(sub)
    cli_train.add_data(sub)
    cli_train.add_train(sub)
    cli_inspect.add_plot(sub)
    cli_inspect.add_summary(sub)
    cli_inspect.add_visualize(sub)
    serving_cli.add_commands(sub)
    return parser


def _missing_modules(modules) -> list[str]:
    """The modules of `modules` that cannot be imported here (found without importing them)."""
    import importlib.util

    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in serving_cli.COMMANDS:  # the serving side's own parser and handlers
        return serving_cli.main(argv)
    parser = build_parser()  # the training commands, and the serving ones for `nlstm --help`
    args = parser.parse_args(argv)
    missing = _missing_modules(getattr(args, "needs", ()))
    if missing:
        print(
            f"nlstm {args.command}: error: this command needs {', '.join(missing)}, which the base "
            f"install (serving only) leaves out: {TRAIN_EXTRA_HINT}",
            file=sys.stderr,
        )
        return 2
    try:
        return serving_cli.run_handler(args)  # Ctrl-C and the user's errors as for every command
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        print(
            f"nlstm {args.command}: error: {exc.name} is not installed: {TRAIN_EXTRA_HINT}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
