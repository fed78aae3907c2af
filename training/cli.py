"""The `nlstm` command: the one place where flags are parsed. Its training side lives here
(train, export, quantize, params, plot, summary, visualize, data), its serving side in
serving/cli.py (serve, generate, score, classify, session).

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
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from serving import cli as serving_cli
from serving.cli import env_default
from serving.cli import http_ssl as _http_ssl  # noqa: F401  (the name tests/test_http.py knows)

# What to do when a command of the `train` extra runs in the base (serving) install.
TRAIN_EXTRA_HINT = (
    "install the training extra: pip install 'nlstm[train]' (in a checkout: pip install -e "
    "'.[train]'); on a machine without a GPU install the CPU build of torch first, or pip "
    "fetches the multi-GB CUDA one: pip install torch --index-url https://download.pytorch.org/whl/cpu"
)
TRAIN_EXTRA_MODULES = ("torch", "onnx", "onnxscript", "matplotlib")


# --------------------------------------------------------------------------------------- params
def _add_params(sub: argparse._SubParsersAction) -> None:
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
        key = name.replace("-", "_")
        key = key if key in allowed_keys() else nearest_key(key)
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


def _add_train(sub: argparse._SubParsersAction) -> None:
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


# ----------------------------------------------------------------------------------------- plot
def _add_plot(sub: argparse._SubParsersAction) -> None:
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
def _add_summary(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "summary",
        help="a results table (markdown) of one or more runs, mean and spread over seeds",
        description=(
            "Print each RUN's figures at its best validation (the test figure at that "
            "evaluation, as the paper reports) as a markdown table. Runs whose folder names "
            "differ only by a trailing -sN / -seedN are one row: mean and sample standard "
            "deviation over the seeds. Every RUN must be of the same task."
        ),
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folder")
    p.set_defaults(handler=_run_summary)


def _run_summary(args: argparse.Namespace) -> int:
    from training.summary import group, markdown, read_run

    print(markdown(group([read_run(r) for r in args.runs])), end="")
    return 0


# ------------------------------------------------------------------------------------ visualize
def _add_visualize(sub: argparse._SubParsersAction) -> None:
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


# --------------------------------------------------------------------------------------- export
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to an ONNX model folder that serving runs without torch",
        description=(
            "Write OUT/model.onnx (one recurrent step, the state as explicit input and output), "
            "OUT/sequence.onnx (a whole sequence in one call, shipped when it measures faster), "
            "OUT/tokenizer.model (text models) and OUT/meta.json (docs/export.md). The folder is "
            "written atomically; an existing export at OUT is replaced, any other folder refused."
        ),
    )
    p.add_argument("checkpoint", type=Path, help="a checkpoint written by `nlstm train`")
    p.add_argument(
        "--out", type=Path, required=True, help="the folder to write, e.g. exported/ptb-nlstm"
    )
    p.add_argument(
        "--no-sequence",
        action="store_true",
        help="export the step graph only (default: also the sequence graph, kept if faster)",
    )
    p.add_argument(
        "--quantize",
        choices=("int8", "float16"),
        default=None,
        help="also write a quantized copy (nlstm quantize OUT --out QUANTIZED_OUT), measured "
        "against this export on the task's data",
    )
    p.add_argument(
        "--quantized-out",
        type=Path,
        default=None,
        help="the quantized folder (default: OUT-int8 or OUT-float16)",
    )
    _add_quantize_flags(p)
    p.set_defaults(handler=_run_export, needs=("torch", "onnx", "onnxscript"))


def _run_export(args: argparse.Namespace) -> int:
    started = time.monotonic()

    def progress(text: str) -> None:  # on stderr, so that stdout stays the summary below
        print(f"[{time.monotonic() - started:5.1f} s] {text}", file=sys.stderr, flush=True)

    progress("loading torch and the exporter")
    from training.export import export_checkpoint

    meta = export_checkpoint(
        args.checkpoint,
        args.out,
        sequence="never" if args.no_sequence else "auto",
        progress=progress,
    )
    print(f"exported {meta.task} {meta.kind} {meta.core} to {args.out}")
    for name, digest in meta.files.items():
        print(f"  {name:<16} sha256 {digest[:16]}...")
    t = meta.sequence_timing
    if t.get("shipped"):
        print(f"  sequence graph shipped: {t['speedup']}x the step graph per step")
    elif "speedup" in t:
        print(f"  sequence graph not shipped: {t['speedup']}x the step graph per step")
    else:
        print(f"  sequence graph not exported{': ' + t['error'] if 'error' in t else ''}")
    print(f"  state (B, {meta.num_slots}, {meta.hidden_size}): {', '.join(meta.state_slots)}")
    if args.quantize is None:
        return 0
    # In a fresh process: the quantizer times onnxruntime, which torch's threads (loaded here by
    # the export) would slow; `nlstm quantize` itself never imports torch.
    out = args.quantized_out or args.out.with_name(f"{args.out.name}-{args.quantize}")
    cmd = [
        sys.executable,
        "-m",
        "training.cli",
        "quantize",
        str(args.out),
        "--out",
        str(out),
        "--precision",
        args.quantize,
        *_quantize_argv(args),
    ]
    return subprocess.run(cmd, check=False).returncode


# ------------------------------------------------------------------------------------- quantize
def _add_quantize_flags(p: argparse.ArgumentParser) -> None:
    # The thresholds' defaults live in training.quantize (None here: importing it would load
    # numpy and sentencepiece for every command).
    p.add_argument(
        "--method",
        default="auto",
        help="int8: auto (measure every candidate, keep the best), dynamic, static, or a "
        "candidate's name (docs/export.md)",
    )
    p.add_argument(
        "--max-bpc-increase",
        type=float,
        default=None,
        help="refuse a char model whose bits per character rise more than this on the "
        "validation or test split (default 0.01)",
    )
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=None,
        help="refuse a glimpse classifier whose accuracy drops more than this many points "
        "(default 0.3)",
    )
    p.add_argument(
        "--accept-cost",
        action="store_true",
        help="write the quantized folder even over the threshold (meta.json says so)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=env_default("DATA_DIR", None, Path),
        help="raw data of the model's task, to measure the cost on [NLSTM_DATA_DIR]",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=env_default("CACHE_DIR", None, Path),
        help="prepared data cache [NLSTM_CACHE_DIR]",
    )
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the evaluation")


def _quantize_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--method", args.method, "--threads", str(args.threads)]
    for flag, value in (
        ("--max-bpc-increase", args.max_bpc_increase),
        ("--max-accuracy-drop", args.max_accuracy_drop),
    ):
        argv += [flag, repr(value)] if value is not None else []
    argv += ["--accept-cost"] if args.accept_cost else []
    argv += ["--data-dir", str(args.data_dir)] if args.data_dir else []
    argv += ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
    return argv


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize an exported folder (int8 on the CPU, float16 for CUDA), cost measured",
        description=(
            "Write OUT: FOLDER's step graph quantized with onnxruntime's tools, what to quantize "
            "chosen by measurement, and a meta.json with the precision, the settings, and the "
            "figures of both models on the full validation and test splits (docs/export.md). "
            "Refused (exit 3, nothing written) when the cost passes the threshold, unless "
            "--accept-cost."
        ),
    )
    p.add_argument("folder", type=Path, help="a float32 export, e.g. exported/ptb-nlstm")
    p.add_argument(
        "--out", type=Path, required=True, help="the folder to write, e.g. exported/ptb-nlstm-int8"
    )
    p.add_argument("--precision", choices=("int8", "float16"), default="int8")
    _add_quantize_flags(p)
    p.set_defaults(handler=_run_quantize, needs=("onnx",))  # onnx: the train extra


def _run_quantize(args: argparse.Namespace) -> int:
    from serving.formats import ExportMeta
    from training.quantize import (
        EvalData,
        QuantizationCost,
        QuantizationError,
        Thresholds,
        quantize_folder,
    )

    try:
        if args.precision == "float16":  # before the data is loaded: can CUDA start here?
            from serving.runtime import load_model

            try:
                load_model(args.folder, providers="cuda")
            except RuntimeError as exc:
                raise QuantizationError(
                    f"float16 step graphs are for the CUDA provider, which cannot start here: {exc}"
                ) from None
        meta = ExportMeta.from_folder(args.folder)
        data = EvalData.for_task(meta, args.data_dir, args.cache_dir)
        result = quantize_folder(
            args.folder,
            args.out,
            data=data,
            precision=args.precision,
            method=args.method,
            thresholds=Thresholds(
                **{
                    k: v
                    for k, v in (
                        ("max_bpc_increase", args.max_bpc_increase),
                        ("max_accuracy_drop", args.max_accuracy_drop),
                    )
                    if v is not None
                }
            ),
            accept_cost=args.accept_cost,
            threads=args.threads,
            providers="cuda" if args.precision == "float16" else "cpu",
        )
    except QuantizationCost as exc:
        print(f"nlstm quantize: REFUSED: {exc}", file=sys.stderr)
        return 3
    except RuntimeError as exc:  # QuantizationError, or CUDA that cannot start
        print(f"nlstm quantize: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(result.report))
    q = result.meta.quantization
    if result.over_threshold:
        print(
            f"WARNING: the cost {q['cost']} ({q['cost_unit']}) passes the threshold "
            f"{q['threshold']}; written because --accept-cost was given",
            file=sys.stderr,
        )
    print(
        f"wrote {args.out}: {result.meta.precision} ({q['settings']['name']}), "
        f"{sum((args.out / n).stat().st_size for n in result.meta.files) / 2**20:.1f} MiB"
    )
    return 0


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nlstm",
        description="Nested LSTMs and their baselines: train, export and serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_params(sub)
    _add_export(sub)
    _add_quantize(sub)
    _add_data(sub)
    _add_train(sub)
    _add_plot(sub)
    _add_summary(sub)
    _add_visualize(sub)
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
