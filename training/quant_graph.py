"""The quantized step graph itself: which ways of quantizing it there are (`CANDIDATES`) and
writing a float32 step graph int8 (onnxruntime's `quantize_dynamic` / `quantize_static`, never
hand-written quantization) or float16 (onnxruntime's converter), checked by onnx.checker. Also
`drop_initializer_value_info`, which training/export.py applies to every graph it writes.
Which candidate a folder gets is training/quant_choose.py's; the command, training/quantize.py.
Never imports torch.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serving.formats import LOGITS_OUTPUT, STEP_GRAPH
from training.export_folder import write_graph
from training.quant_measure import QuantizationError


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
