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

This module is the command: checks, the full measurement, the refusal and the folder. The graph
rewriting (the candidates, onnxruntime's tools) is training/quant_graph.py; choosing among the
int8 candidates, training/quant_choose.py; how a model is measured (its figures on a split, a
step's CPU time), training/quant_measure.py. float16 folders record no speed here: the CPU
provider is not where they are meant to run.

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

from serving.formats import META_FILE, STEP_GRAPH, TOKENIZER_FILE, ExportMeta, file_sha256
from training.export_folder import building, check_target, write_meta
from training.quant_choose import SCREEN_BATCHES, choose_int8
from training.quant_graph import (
    CANDIDATES,
    Candidate,
    drop_initializer_value_info,
    float16_graph,
    load_step_graph,
    quantize_graph,
)
from training.quant_measure import (
    EvalData,
    QuantizationError,
    cost,
    evaluate,
    local_model,
    step_cpu_us,
)

log = logging.getLogger(__name__)

QUANTIZED_PRECISIONS = ("int8", "float16")
# The defaults for refusing a quantized folder: its cost on the validation or the test
# split. Char models (PTB, text8, poems) in bits per character (for the poems, +0.01 bits is
# +0.7% perplexity); glimpse classifiers in points of accuracy.
DEFAULT_MAX_BPC_INCREASE = 0.01
DEFAULT_MAX_ACCURACY_DROP = 0.3


class QuantizationCost(QuantizationError):
    """The quantized model's measured cost passes the threshold: nothing was published."""


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
            chosen_path, settings, candidates_report, report = choose_int8(
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
        chosen_model = local_model(src, chosen_path, meta, providers, threads)
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
