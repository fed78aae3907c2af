"""An exported float32 folder -> an int8 (or float16) folder, with what the speed costs measured.

    nlstm quantize exported/ptb-nlstm --out exported/ptb-nlstm-int8 --data-dir DATA
    quantize_folder("exported/ptb-nlstm", "exported/ptb-nlstm-int8", data=EvalData.for_task(...))

int8: onnxruntime's own quantization tools (`quantize_dynamic`, `quantize_static` with
calibration), never hand-written quantization. What to quantize is chosen per model by
measurement (`CANDIDATES`): each candidate graph is scored on the first batches of the
validation split and timed (one onnxruntime thread, the calling thread's CPU time, at batch 1
and 64, all candidates and the float32 graph alternating in rounds); the fastest one whose
screening cost is within half the user's threshold wins, a candidate within 5% of its speed
and cheaper in quality is preferred. The winner and the float32 graph are then measured on the
full validation and test splits; a cost over the threshold refuses the folder (QuantizationCost)
unless the caller accepts it, and the folder's meta.json says so either way.

float16: the float32 graph with its weights and arithmetic in float16 (onnxruntime's converter,
inputs, outputs and the state kept float32), for the CUDA provider; measured the same way.

Why the thread CPU time: this project's machine is shared (2 cores, training in the background),
where wall-clock timings of one graph move by 3x within a minute. With one intra-op thread,
onnxruntime computes in the calling thread, whose CPU time other processes do not inflate.

Dynamic int8 quantizes each MatMul's activations with one scale per call, computed over the
whole batch: a stream's logits then depend (slightly) on the other streams stepped with it.
Static quantization has fixed scales (batch-independent) but costs more here (docs/export.md).

The step graph is quantized; a float32 folder's sequence graph is not carried over (the server
steps sessions through the step graph; `run` and `score` use it per step).

How a model is measured (its figures on a split, a step's CPU time) is training/quant_measure.py.
float16 folders record no speed here: the CPU provider is not where they are meant to run.

This module never imports torch: `nlstm quantize` runs in a process without it, and so does the
quantization after `nlstm export --quantize` (a subprocess), so that the timings are onnxruntime's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from serving.formats import (
    LOGITS_OUTPUT,
    META_FILE,
    STEP_GRAPH,
    TOKENIZER_FILE,
    ExportMeta,
    Tokenizer,
    file_sha256,
)
from training.export_folder import building, check_target, write_graph, write_meta
from training.quant_measure import (
    EvalData,
    QuantizationError,
    cost,
    evaluate,
    step_cpu_us,
)

log = logging.getLogger(__name__)

QUANTIZED_PRECISIONS = ("int8", "float16")
# The defaults for refusing a quantized folder: its cost on the validation or the test
# split. Char models (PTB, text8, poems) in bits per character (for the poems, +0.01 bits is
# +0.7% perplexity); glimpse classifiers in points of accuracy.
DEFAULT_MAX_BPC_INCREASE = 0.01
DEFAULT_MAX_ACCURACY_DROP = 0.3
# A candidate is admissible when its screening cost (the first batches of the validation split)
# is within this share of the threshold: the full splits move the figure a little.
SCREEN_MARGIN = 0.5
SCREEN_BATCHES = 24  # validation batches the candidates are scored on (PTB: 76,800 characters)
# Candidates whose speed is within this share of the fastest count as equally fast (the timing
# noise on a shared machine); among them the cheapest in quality wins.
SPEED_TIE = 0.05


class QuantizationCost(QuantizationError):
    """The quantized model's measured cost passes the threshold: nothing was published."""


# --------------------------------------------------------------------------------- the graph
def drop_initializer_value_info(graph) -> None:
    """Remove the `value_info` records that describe initializers (the weights), here and in
    subgraphs. torch's exporter writes one per weight, repeating the shape the initializer
    carries; tools that rewrite weights trip over the stale copy: onnxruntime's quantize_dynamic
    turns a Gemm's (4H, H) weight into a MatMul's (H, 4H) one, and its shape inference then stops
    with "Inferred shape and existing shape differ in dimension 0: (600) vs (2400)". Records of
    computed values stay (they are right). training/export.py applies it to every graph it
    writes; quantize_folder to its input too, for folders exported before."""
    import onnx

    names = {t.name for t in graph.initializer}
    keep = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                drop_initializer_value_info(attr.g)
            for g in attr.graphs:
                drop_initializer_value_info(g)


def _topological_sort(graph) -> None:
    """Order the nodes so that each comes after the producers of its inputs (onnxruntime's
    float16 converter appends its Cast nodes at the end, which onnx.checker refuses)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise QuantizationError("the converted graph has a cycle or an input nobody produces")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def _head_node(model) -> str:
    """The name of the node computing the logits (the softmax head's Gemm)."""
    for node in model.graph.node:
        if LOGITS_OUTPUT in node.output:
            return node.name
    raise QuantizationError(f"the step graph has no node producing {LOGITS_OUTPUT!r}")


@dataclass(frozen=True)
class Candidate:
    """One way to quantize the step graph with onnxruntime's tools."""

    name: str
    method: str  # "dynamic" (activation scales per call) | "static" (calibrated, fixed scales)
    op_types: tuple[str, ...]  # operator types whose weights become int8 (Gemm, MatMul, Gather)
    per_channel: bool  # one weight scale per output channel (else one per tensor)
    float_head: bool = False  # keep the softmax head's Gemm float32

    def settings(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "op_types": list(self.op_types),
            "weight_type": "int8",
            "activation_type": "uint8",
        }


GEMMS = ("Gemm", "MatMul")
CANDIDATES = (
    # what the issue tried by hand: onnxruntime's defaults (the embedding Gather included)
    Candidate("dynamic-per-tensor", "dynamic", (*GEMMS, "Gather"), per_channel=False),
    Candidate("dynamic-per-channel", "dynamic", (*GEMMS, "Gather"), per_channel=True),
    Candidate(
        "dynamic-per-channel-float-head",
        "dynamic",
        (*GEMMS, "Gather"),
        per_channel=True,
        float_head=True,
    ),
    Candidate("dynamic-per-channel-float-embedding", "dynamic", GEMMS, per_channel=True),
    Candidate("static-per-channel", "static", GEMMS, per_channel=True),
)


def load_step_graph(folder: Path):
    """The folder's step graph, its initializers' value_info dropped (see above)."""
    import onnx

    model = onnx.load(str(folder / STEP_GRAPH))
    drop_initializer_value_info(model.graph)
    return model


def quantize_graph(
    model, candidate: Candidate, out: Path, calibration: list[dict] | None = None
) -> None:
    """Write `model` (a float32 step graph) quantized as `candidate` says to `out`, checked."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    exclude: list[str] = []
    if candidate.float_head:
        head = _head_node(model)
        # quantize_dynamic rewrites a Gemm as MatMul (+ Add) named after it before it quantizes
        exclude = [head, f"{head}_MatMul"]
    # onnxruntime's quantizer logs "consider pre-processing" for every graph: quant_pre_process
    # would only run the shape inference and the graph optimizations the session runs anyway.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="nlstm-quant-") as tmp:
            src = Path(tmp) / "float32.onnx"
            onnx.save(model, str(src))
            if candidate.method == "dynamic":
                quantize_dynamic(
                    src,
                    out,
                    op_types_to_quantize=list(candidate.op_types),
                    per_channel=candidate.per_channel,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=exclude,
                )
            else:
                if not calibration:
                    raise QuantizationError("static quantization needs calibration inputs")
                feeds = calibration  # narrowed to a list here, which the class below cannot see

                class Reader(CalibrationDataReader):
                    def __init__(self) -> None:
                        self.it = iter(feeds)

                    def get_next(self):
                        return next(self.it, None)

                quantize_static(
                    src,
                    out,
                    Reader(),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(candidate.op_types),
                    per_channel=candidate.per_channel,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=exclude,
                )
    finally:
        root.setLevel(level)
    q = onnx.load(str(out))
    drop_initializer_value_info(q.graph)
    _finish_graph(q, model, out)


def float16_graph(model, out: Path) -> None:
    """Write `model` with float16 weights and arithmetic to `out`; the inputs, the outputs and the
    state stay float32 (keep_io_types), so the graph's signature is the float32 one."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(model, keep_io_types=True)
    _topological_sort(half.graph)
    _finish_graph(half, model, out)


def _finish_graph(q, reference, out: Path) -> None:
    import onnx

    q.ir_version = reference.ir_version  # onnxruntime reads IR 9; the tools may write newer
    q.producer_name = reference.producer_name
    try:
        onnx.checker.check_model(q, full_check=True)
    except Exception as exc:
        raise QuantizationError(f"the converted graph fails onnx.checker: {exc}") from exc
    write_graph(q, out)


# ------------------------------------------------------------------------------- the folder
@dataclass
class Thresholds:
    """Refuse a quantized folder whose cost on the validation or the test split passes these."""

    max_bpc_increase: float = DEFAULT_MAX_BPC_INCREASE  # char models, bits per character
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP  # glimpse models, points of accuracy

    def __post_init__(self) -> None:
        for name in ("max_bpc_increase", "max_accuracy_drop"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")

    def limit(self, kind: str) -> float:
        return self.max_accuracy_drop if kind == "glimpses" else self.max_bpc_increase

    @staticmethod
    def unit(kind: str) -> str:
        return "points of accuracy" if kind == "glimpses" else "bits per character"


@dataclass
class QuantizeResult:
    meta: ExportMeta
    over_threshold: bool  # the cost passed the threshold and the caller accepted it
    report: list[str] = field(default_factory=list)  # human lines: candidates, figures, speed


def _local(
    model_folder: Path, graph: Path, meta: ExportMeta, providers: str = "cpu", threads: int = 1
):
    """An ExportedModel over `graph` with `meta`'s description (a candidate not yet a folder)."""
    from serving.runtime import ExportedModel, _create_session, _session_options

    sess = _create_session(graph, providers, _session_options(threads, 1))
    tok = Tokenizer.from_file(model_folder / TOKENIZER_FILE) if meta.has_tokenizer else None
    return ExportedModel(model_folder, meta, tok, sess, None)


def _choose_int8(
    graph,
    f32_graph: Path,
    work_dir: Path,
    *,
    src: Path,
    meta: ExportMeta,
    reference,
    data: EvalData,
    method: str,
    limit: float,
    unit: str,
    screen_batches: int,
    providers: str,
    threads: int,
    timing_rounds: int,
):
    """Quantize `graph` every way `method` allows, score each candidate on the first
    `screen_batches` validation batches and time it against the float32 graph; returns the
    chosen graph's path, its settings, the candidates' figures and report lines."""
    report: list[str] = []
    if method == "auto":
        wanted = list(CANDIDATES)
    elif method in ("dynamic", "static"):
        wanted = [c for c in CANDIDATES if c.method == method]
    else:
        wanted = [c for c in CANDIDATES if c.name == method]
    calibration = None
    if any(c.method == "static" for c in wanted):
        calibration = data.calibration_feeds(reference)
    paths: dict[str, Path] = {}
    digests: dict[str, str] = {}
    for c in wanted:
        p = work_dir / f"{c.name}.onnx"
        quantize_graph(graph, c, p, calibration)
        digest = file_sha256(p)
        if digest in digests.values():  # e.g. no Gather in a glimpse model: same graph
            continue
        paths[c.name], digests[c.name] = p, digest
    screen_ref = evaluate(reference, data, "valid", screen_batches)
    screened = {}
    for name, p in paths.items():
        figures = evaluate(_local(src, p, meta, providers, threads), data, "valid", screen_batches)
        screened[name] = cost(data.kind, screen_ref, figures)
    timing = step_cpu_us({"float32": f32_graph, **paths}, meta, rounds=timing_rounds)
    speed = {k: math.sqrt(v["1"] * v["64"]) for k, v in timing.items()}
    admissible = [k for k in paths if screened[k] <= limit * SCREEN_MARGIN] or [
        min(paths, key=lambda k: screened[k])
    ]
    fastest = min(speed[k] for k in admissible)
    near = [k for k in admissible if speed[k] <= fastest * (1 + SPEED_TIE)]
    chosen = min(near, key=lambda k: (screened[k], speed[k]))
    chosen_path = paths[chosen]
    settings = next(c for c in CANDIDATES if c.name == chosen).settings()
    settings["tool"] = f"onnxruntime.quantization.quantize_{settings['method']}"
    if settings["method"] == "static":
        settings["calibration"] = {
            "split": "train",
            "feeds": len(calibration or []),
            "method": "MinMax",
            "format": "QDQ",
        }
    candidates_report = []
    for k, p in paths.items():
        candidates_report.append(
            {
                "name": k,
                "screen_cost": round(screened[k], 6),
                "step_cpu_us": {b: round(v, 1) for b, v in timing[k].items()},
                "speedup": {b: round(timing["float32"][b] / v, 3) for b, v in timing[k].items()},
                "bytes": p.stat().st_size,
                "chosen": k == chosen,
            }
        )
        report.append(
            f"  candidate {k:<38} screening cost {screened[k]:+.4f} {unit}; step "
            + ", ".join(f"batch {b} {timing['float32'][b] / v:.2f}x" for b, v in timing[k].items())
            + ("  <- chosen" if k == chosen else "")
        )
    report.insert(
        0,
        f"screened on the first {screen_batches} validation batches "
        f"({screen_ref['items']:,} {'images' if data.kind == 'glimpses' else 'characters'})",
    )
    return chosen_path, settings, candidates_report, report


def quantize_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    data: EvalData,
    precision: str = "int8",
    method: str = "auto",
    thresholds: Thresholds | None = None,
    accept_cost: bool = False,
    threads: int = 1,
    screen_batches: int = SCREEN_BATCHES,
    providers: str = "cpu",
    timing_rounds: int = 7,
) -> QuantizeResult:
    """Quantize the float32 export `src` into the folder `out` (see the module docstring).

    method: "auto" (measure CANDIDATES, keep the best), "dynamic" or "static" (only those
    candidates), or a candidate's name. The float32 and the quantized model are measured on the
    full validation and test splits of `data`; when the cost on either passes `thresholds`,
    QuantizationCost is raised and nothing is written, unless accept_cost (then the folder is
    written, its meta.json's quantization.over_threshold is true, and a warning is logged).
    providers: where the figures are measured ("cpu"; "cuda" for float16). threads: onnxruntime
    intra-op threads for the evaluation. timing_rounds: rounds of the speed measurements
    (fewer: quicker, noisier; the tests use 1). The folder is written beside `out` and renamed into
    place; an existing export at `out` is replaced, anything else there is refused.
    """
    from serving.runtime import load_model

    src, out = Path(src), Path(out)
    if precision not in QUANTIZED_PRECISIONS:
        raise ValueError(f"precision must be one of {QUANTIZED_PRECISIONS}, got {precision!r}")
    names = [c.name for c in CANDIDATES]
    if precision == "int8" and method not in ("auto", "dynamic", "static", *names):
        raise ValueError(
            f"method must be 'auto', 'dynamic', 'static' or one of {names}, got {method!r}"
        )
    if src.resolve() == out.resolve():
        raise ValueError(f"--out must differ from the float32 folder {src}")
    thresholds = thresholds or Thresholds()
    reference = load_model(src, providers=providers, intra_op_threads=threads, inter_op_threads=1)
    meta = reference.meta
    if meta.precision != "float32":
        raise QuantizationError(
            f"{src} holds a {meta.precision} model; quantize its float32 export"
        )
    data.check_folder(src, meta)
    check_target(out)
    report: list[str] = []
    unit, limit = Thresholds.unit(data.kind), thresholds.limit(data.kind)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="nlstm-quantize-") as work:
        work_dir = Path(work)
        f32_graph = work_dir / "float32.onnx"
        graph = load_step_graph(src)
        f32_graph.write_bytes(graph.SerializeToString())
        # --------------------------------------------------------- candidates
        if precision == "float16":
            chosen_path = work_dir / "float16.onnx"
            float16_graph(graph, chosen_path)
            settings: dict[str, Any] = {
                "name": "float16",
                "method": "float16",
                "tool": "onnxruntime.transformers.float16.convert_float_to_float16",
                "keep_io_types": True,
            }
            candidates_report: list[dict] = []
        else:
            chosen_path, settings, candidates_report, report = _choose_int8(
                graph,
                f32_graph,
                work_dir,
                src=src,
                meta=meta,
                reference=reference,
                data=data,
                method=method,
                limit=limit,
                unit=unit,
                screen_batches=screen_batches,
                providers=providers,
                threads=threads,
                timing_rounds=timing_rounds,
            )
        # ----------------------------------------------------- full measurement
        chosen_model = _local(src, chosen_path, meta, providers, threads)
        figures: dict[str, dict[str, float]] = {"float32": {}, precision: {}}
        costs = {}
        for split in ("valid", "test"):
            ref = evaluate(reference, data, split)
            q = evaluate(chosen_model, data, split)
            costs[split] = cost(data.kind, ref, q)
            for d, r in ((figures["float32"], ref), (figures[precision], q)):
                d.update({f"{split}_{k}": v for k, v in r.items() if k != "items"})
                d[f"{split}_items"] = r["items"]
        worst = max(costs.values())
        over = worst > limit
        speed_final = (
            step_cpu_us({"float32": f32_graph, precision: chosen_path}, meta, rounds=timing_rounds)
            if precision == "int8"
            else {}
        )
        report.append(
            f"{precision} ({settings['name']}): "
            + ", ".join(
                f"{s} {figures['float32'][f'{s}_{m}']:.4f} -> {figures[precision][f'{s}_{m}']:.4f} "
                f"({costs[s]:+.4f} {unit})"
                for s in ("valid", "test")
                for m in (["acc"] if data.kind == "glimpses" else ["bpc"])
            )
        )
        if speed_final:
            report.append(
                "step (one thread, CPU time): "
                + ", ".join(
                    f"batch {b} {speed_final['float32'][b]:.0f} -> "
                    f"{speed_final[precision][b]:.0f} us "
                    f"({speed_final['float32'][b] / speed_final[precision][b]:.2f}x)"
                    for b in speed_final["float32"]
                )
            )
        if over and not accept_cost:
            raise QuantizationCost(
                f"{precision} costs {worst:+.4f} {unit} on the "
                f"{max(costs, key=costs.__getitem__)} split, over the threshold of {limit} "
                f"(valid {costs['valid']:+.4f}, test {costs['test']:+.4f}); nothing was written. "
                "Raise the threshold, try another --method, or accept the cost explicitly "
                "(--accept-cost)\n" + "\n".join(report)
            )
        if over:
            log.warning(
                "%s: the %s model costs %+.4f %s, over the threshold of %s; written anyway "
                "because the cost was accepted",
                out,
                precision,
                worst,
                unit,
                limit,
            )

        quantization = {
            "precision": precision,
            "settings": settings,
            "onnxruntime": _ort_version(),
            "source": {"folder": src.name, "precision": meta.precision, "files": dict(meta.files)},
            "reference_figures": {k: _round_value(v) for k, v in figures["float32"].items()},
            "figures": {k: _round_value(v) for k, v in figures[precision].items()},
            "cost": {s: round(v, 6) for s, v in costs.items()},
            "cost_unit": unit,
            "thresholds": asdict(thresholds),
            "threshold": limit,
            "over_threshold": over,
            "evaluation": {
                "data": data.description,
                "batch_size": data.batch_size,
                "seq_len": data.seq_len if data.kind == "stream" else None,
                "providers": providers,
                "threads": threads,
                "how": "serving.runtime over the trainer's evaluation batches, full splits",
            },
            "speed": {
                "how": "onnxruntime CPU provider, 1 intra-op thread, the calling thread's CPU time "
                f"per step, best of {timing_rounds} alternating rounds",
                "step_cpu_us": {
                    k: {b: round(v, 1) for b, v in t.items()} for k, t in speed_final.items()
                },
                "speedup": {
                    b: round(speed_final["float32"][b] / speed_final[precision][b], 3)
                    for b in speed_final.get("float32", {})
                },
            }
            if speed_final
            else {},
            "candidates": candidates_report,
            "batch_invariant": settings.get("method") != "dynamic",
            "seconds": round(time.perf_counter() - started, 1),
        }
        new_figures = {
            k: v
            for k, v in meta.figures.items()
            if k in ("best_epoch", "best_step", "epoch", "step")
        }
        for s in ("valid", "test"):
            new_figures.update(
                {
                    k: v
                    for k, v in figures[precision].items()
                    if k.startswith(f"{s}_") and not k.endswith("_items")
                }
            )
        with building(out) as tmp:  # replaces an export at `out`, refuses anything else
            shutil.copyfile(chosen_path, tmp / STEP_GRAPH)
            if meta.has_tokenizer:
                shutil.copyfile(src / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
            files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
            new = ExportMeta(
                **{
                    **asdict(meta),
                    "files": files,
                    "sequence_graph": False,
                    "sequence_timing": {
                        "shipped": False,
                        "why": f"the {precision} folder ships the step graph only",
                    },
                    "figures": _json_clean(new_figures),
                    "precision": precision,
                    "quantization": _json_clean(quantization),
                }
            )
            write_meta(new, tmp / META_FILE)
    return QuantizeResult(ExportMeta.from_folder(out), over, report)


def _round_value(v):
    return round(v, 6) if isinstance(v, float) else v


def _json_clean(d: Any) -> Any:
    return json.loads(json.dumps(d, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


__all__ = [
    "CANDIDATES",
    "DEFAULT_MAX_ACCURACY_DROP",
    "DEFAULT_MAX_BPC_INCREASE",
    "Candidate",
    "EvalData",
    "QuantizationCost",
    "QuantizationError",
    "QuantizeResult",
    "Thresholds",
    "cost",
    "drop_initializer_value_info",
    "evaluate",
    "float16_graph",
    "quantize_folder",
    "quantize_graph",
    "step_cpu_us",
]
