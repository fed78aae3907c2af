"""The `nlstm` commands that turn a checkpoint into something serving runs (the parser is built
in training/cli.py): `export` (an ONNX model folder, optionally quantized) and `quantize` (an
exported folder in int8 or float16, its cost measured and refused past a threshold). Each
handler imports its implementation lazily.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from serving.settings import env_default


# --------------------------------------------------------------------------------------- export
def add_export(sub: argparse._SubParsersAction) -> None:
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


def add_quantize(sub: argparse._SubParsersAction) -> None:
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
