"""The `nlstm` commands that get data and train (the parser is built in training/cli.py): `data
download|prepare` and `train`, with its key=value config overrides, its unknown-flag hints
(`--epochs 1` where `epochs=1` was meant), and what it prints when it ends or is interrupted.
Each handler imports its implementation lazily.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path


# ----------------------------------------------------------------------------------------- data
def add_data(sub: argparse._SubParsersAction) -> None:
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
            q.add_argument(
                "--force", action="store_true", help="prepare again even if a cache exists"
            )
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


# ---------------------------------------------------------------------------------------- train
class _IntermixedParser(argparse.ArgumentParser):
    """Accepts options and positionals in any order (`CONFIG --run-dir D key=value ...`).

    Plain argparse cannot give a `*` positional the words that follow an option once an earlier
    positional (CONFIG) has been matched; parse_known_intermixed_args can, and calls back into
    parse_known_args, hence the guard."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            namespace, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False
        flags = [a for a in extras if a.startswith("-")]
        if flags:  # here, with this command's usage, not the top-level parser's
            self.error(_unknown_flags_message(flags, list(sys.argv[1:] if args is None else args)))
        return namespace, extras


def _unknown_flags_message(flags: list[str], args: list[str]) -> str:
    """`--epochs 1` where `epochs=1` was meant: name the override to write instead."""
    from training.config import allowed_keys, nearest_key

    hints = []
    for flag in flags:
        name, eq, value = flag.lstrip("-").partition("=")
        typed = name.replace("-", "_")
        key = typed if typed in allowed_keys() else nearest_key(typed)
        if key is None:
            continue
        if not eq:
            i = args.index(flag) if flag in args else -1
            value = (
                args[i + 1]
                if 0 <= i < len(args) - 1 and not args[i + 1].startswith("-")
                else "VALUE"
            )
        hints.append(f"{key}={value}")
    message = f"unrecognized arguments: {' '.join(flags)}"
    if hints:
        message += (
            f"; config values are overrides written key=value, not --options: did you mean "
            f"{' '.join(hints)}?"
        )
    return message


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a config file (one per row of the paper's tables)",
        description=(
            "Train the model of CONFIG (a TOML file, e.g. configs/ptb-nlstm-2x600.toml) in "
            "--run-dir: metrics.jsonl, last.pt and best.pt. Any config value can be overridden "
            "as key=value (dotted for nested keys: model.hidden_size=128 optimizer.lr=0.001). "
            "Several processes: torchrun --nproc_per_node=N -m training.cli train ..."
        ),
    )
    p.__class__ = _IntermixedParser  # options and key=value overrides in any order
    p.add_argument("config", type=Path, help="TOML config file")
    p.add_argument("--run-dir", type=Path, required=True, help="folder for metrics and checkpoints")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its last.pt (starts it when there is none)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after N optimizer steps in all (evaluates and checkpoints first); "
        "sets max_steps",
    )
    p.add_argument(
        "--progress",
        choices=("auto", "on", "off"),
        default="auto",
        help="progress bar on stderr (auto: only when stderr is a terminal)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. epochs=1 optimizer.lr=0.001 (not --epochs 1)",
    )
    p.set_defaults(handler=_run_train, needs=("torch",))


def _run_train(args: argparse.Namespace) -> int:
    # The config and the run folder are checked before torch, the data or the model load
    # (seconds), so that a typo or a taken --run-dir is reported at once.
    from training.config import load_config
    from training.run_folder import refuse_existing_run

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    config = load_config(args.config, overrides)
    if not args.resume:
        refuse_existing_run(args.run_dir)
    progress = {"auto": None, "on": True, "off": False}[args.progress]
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, one message
    started = time.monotonic()

    from training.trainer import train

    try:
        summary = train(config, args.run_dir, resume=args.resume, progress=progress)
    except KeyboardInterrupt as exc:
        if main_rank:
            print(
                _interrupted_message(
                    args, config, getattr(exc, "step", None), getattr(exc, "saved_step", None)
                ),
                file=sys.stderr,
            )
        return 130
    if main_rank:
        print(_summary_line(summary, time.monotonic() - started))
    return 0


def _resume_command(args: argparse.Namespace) -> str:
    words = ["nlstm", "train", str(args.config), "--run-dir", str(args.run_dir), "--resume"]
    if args.max_steps is not None:
        words += ["--max-steps", str(args.max_steps)]
    return shlex.join(words + list(args.overrides))


def _interrupted_message(
    args: argparse.Namespace, config, step: int | None, saved_step: int | None
) -> str:
    """What Ctrl-C left behind and the command that continues the run."""
    from training.run_folder import LAST

    last = args.run_dir / LAST
    where = (
        f"interrupted at step {step}" if step is not None else "interrupted before training started"
    )
    when = (
        f"written at each evaluation and every checkpoint_every={config.checkpoint_every} steps"
        if config.checkpoint_every
        else "written at each evaluation"
    )
    if saved_step is not None:
        saved = f"{last} holds step {saved_step} ({when})"
    elif last.exists():
        saved = f"{last} is unchanged ({when})"
    else:
        saved = f"nothing was saved yet (last.pt is {when})"
    return (
        f"nlstm train: {where}; {saved}. Continue with (the same config and overrides):\n"
        f"  {_resume_command(args)}"
    )


def _summary_line(summary: dict, seconds: float) -> str:
    """The run's outcome in words: how it ended, the best validation figures and their test."""
    how = {"done": "finished", "max_steps": "reached max_steps"}.get(
        summary["stopped"], summary["stopped"]
    )
    minutes, secs = divmod(round(seconds), 60)
    took = f"{minutes} min {secs} s" if minutes else f"{secs} s"
    head = f"{how} at step {summary['step']} after {took}"
    best = summary.get("best") or {}
    if not best:
        return f"{head}; no evaluation yet. Run folder: {summary['run_dir']}"
    figures = "; ".join(
        f"best valid {k} {v['valid']:.4f} (epoch {v['epoch']}), its test {k} "
        + ("-" if v.get("test") is None else f"{v['test']:.4f}")
        for k, v in best.items()
    )
    return f"{head}: {figures}. Weights: {Path(summary['run_dir']) / 'best.pt'}"
