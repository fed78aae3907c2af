"""Choosing how to quantize a model to int8, by measurement: every candidate graph
(training/quant_graph.py's CANDIDATES) is scored on the first batches of the validation split
and timed against the float32 graph (training/quant_measure.py); the fastest whose screening
cost is within a share of the threshold wins, and among those about as fast the cheapest in
quality. training/quantize.py then measures the winner on the full splits. Never imports torch.
"""

from __future__ import annotations

import math
from pathlib import Path

from serving.formats import ExportMeta, file_sha256
from training.quant_graph import CANDIDATES, quantize_graph
from training.quant_measure import EvalData, cost, evaluate, local_model, step_cpu_us

# A candidate is admissible when its screening cost (the first batches of the validation split)
# is within this share of the threshold: the full splits move the figure a little.
SCREEN_MARGIN = 0.5
SCREEN_BATCHES = 24  # validation batches the candidates are scored on (PTB: 76,800 characters)
# Candidates whose speed is within this share of the fastest count as equally fast (the timing
# noise on a shared machine); among them the cheapest in quality wins.
SPEED_TIE = 0.05


def choose_int8(
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
        figures = evaluate(
            local_model(src, p, meta, providers, threads), data, "valid", screen_batches
        )
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
