"""torch -> ONNX: the step graph, the sequence graph, and the check that onnxruntime computes what
torch computes (training/export.py builds the exported folder from them; docs/export.md).

The step graph is the *reference* step of each core (`core.reference_step`: NestedLSTMCell.forward
for NLSTM layers, baselines.lstm_step for LSTM layers, HMLSTM.step for HM-LSTMs, with its
whole-batch COPY shortcut off: a data-dependent branch; the values are the same), traced by
torch.export (`torch.onnx.export(dynamo=True)`, the exporter torch >= 2.9 recommends; the
legacy TorchScript exporter still works in torch 2.13 but is deprecated). So the nested cell
comes out unrolled into plain Gemm / Sigmoid / Tanh / Mul / Add operators, never the fused
autograd Function the trainer runs. For char models the one-hot product is a Gather of the first
input weight's transpose (the cell computes it as F.embedding(tokens, W.t()); the exporter folds
the transpose into the initializer). The sequence graph wraps the same step in torch's scan
operator, which the exporter turns into an ONNX Scan: a Python loop would be unrolled to the
example's length instead. The model's kind (training.tasks.ModelKind) gives the graph's input
name and dtype and the random example inputs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from serving.formats import LOGITS_OUTPUT, STATE_INPUT, STATE_OUTPUT
from training.hmlstm import HMLSTM
from training.models import ModelConfig, TaskModel, pack_state, state_slots, unpack_state
from training.nlstm import NestedLSTMCell
from training.quant_graph import drop_initializer_value_info
from training.tasks import model_kind

if TYPE_CHECKING:
    import onnx

# Opset 18 and IR version 9: every operator used here (Gather, Gemm, Split, Slice, Squeeze,
# Unsqueeze, Concat, Sigmoid, Tanh, Mul, Add, Scan) has CPU and CUDA kernels in onnxruntime, and
# onnxruntime >= 1.15 reads IR 9 (onnx 1.23 would write IR 14, which onnxruntime 1.31 refuses).
OPSET = 18
IR_VERSION = 9
# Example sizes for tracing; B and T are dynamic axes, so any other size runs (the tests check).
EXAMPLE_BATCH, EXAMPLE_STEPS = 2, 3


class ExportError(RuntimeError):
    """The exporter produced a graph that fails the checker or disagrees with torch."""


# ---------------------------------------------------------------------------- the step modules
class StepModule(nn.Module):
    """One recurrent step of a task model with the state packed into one tensor.

    forward(x, state) -> (logits, state_out)
      x      (B,) int64 token ids (char models) or (B, input_size) float32 glimpses
      state  (B, S, H) float32, slots as state_slots(config)
      logits (B, V or classes), state_out (B, S, H)

    It runs the core's reference step (core.reference_step) with the model's own parameters,
    then the model's head, so it computes exactly what the model's forward computes per step.
    """

    def __init__(self, model: TaskModel) -> None:
        super().__init__()
        self.model = model
        self.config: ModelConfig = model.config

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        out, new_state = self.model.core.reference_step(x, unpack_state(state, self.config))
        return self.model.head(out), pack_state(new_state)  # (B, V), (B, S, H)


class SequenceModule(nn.Module):
    """The step under torch's scan operator: x (T, B) or (T, B, in) -> logits (T, B, V), final
    state. Exported as one ONNX Scan whose body is the step graph."""

    def __init__(self, step: StepModule) -> None:
        super().__init__()
        self.step = step

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        from torch._higher_order_ops.scan import scan  # prototype API in torch 2.x

        def body(carry: Tensor, x_t: Tensor):
            logits, new = self.step(x_t, carry)
            return new, logits  # (carry, per-step output)

        final, logits = scan(body, state, x)
        return logits, final  # (T, B, V), (B, S, H)


@contextlib.contextmanager
def _traceable(model: nn.Module) -> Iterator[None]:
    """Switch off the NestedLSTMCell's argument checks while tracing: they read tensor values
    (token ids within range), which torch.export cannot turn into a graph. The graph's inputs
    are checked by serving.runtime instead. Restores the checks afterwards."""
    cells = [m for m in model.modules() if isinstance(m, NestedLSTMCell)]
    for cell in cells:
        cell.checks = False
    # An HM-LSTM skips a layer's products when the whole batch copies: a data-dependent branch
    # that a graph cannot hold. Off, the step computes the same values (COPY keeps the state).
    skippers = [(m, m.skip_copy) for m in model.modules() if isinstance(m, HMLSTM)]
    for m, _ in skippers:
        m.skip_copy = False
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for cell in cells:
            cell.checks = True
        for m, value in skippers:
            m.skip_copy = value
        model.train(was_training)


def _example_inputs(config: ModelConfig, steps: int | None, batch: int, seed: int = 0):
    """Random inputs and a random state: (x, state). x is (B,)/(B, in), or with steps
    (T, B)/(T, B, in)."""
    g = torch.Generator().manual_seed(seed)
    lead = (batch,) if steps is None else (steps, batch)
    x = model_kind(config.kind).example_input(config, lead, g)
    S = len(state_slots(config))
    state = torch.randn(batch, S, config.hidden_size, generator=g) * 0.5
    return x, state


def _input_spec(config: ModelConfig) -> tuple[str, str]:
    return model_kind(config.kind).input_spec


def _to_onnx(module: nn.Module, args: tuple, input_name: str, dynamic_shapes) -> onnx.ModelProto:
    """torch.export -> ONNX ModelProto with weights inside, the IR version set, checked."""
    import onnx

    out = io.StringIO()
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notes
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=[input_name, STATE_INPUT],
                output_names=[LOGITS_OUTPUT, STATE_OUTPUT],
                dynamic_shapes=dynamic_shapes,
                opset_version=OPSET,
                external_data=False,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(
            f"torch.onnx.export failed: {type(exc).__name__}: {exc}\n{out.getvalue()[-2000:]}"
        ) from exc
    finally:
        onnx_logger.setLevel(level)
    if program is None:  # dynamo=True always returns one
        raise ExportError("torch.onnx.export returned no ONNX program")
    proto = program.model_proto
    _strip_debug_info(proto.graph)
    drop_initializer_value_info(proto.graph)
    proto.ir_version = IR_VERSION
    proto.producer_name = "nlstm"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported graph fails onnx.checker: {exc}") from exc
    return proto


def _strip_debug_info(graph) -> None:
    """Drop the exporter's per-node debug records (FX node text, source stack traces, module
    paths): they hold local paths, make the file depend on where it was exported, and were 90%
    of a small model's sequence graph."""
    import onnx

    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _strip_debug_info(attr.g)
            for g in attr.graphs:
                _strip_debug_info(g)
    del graph.metadata_props[:]


def step_graph(model: TaskModel) -> onnx.ModelProto:
    """The step graph of a task model (see StepModule), as a checked ModelProto."""
    config = model.config
    B = torch.export.Dim("B", min=1)
    with _traceable(model):
        return _to_onnx(
            StepModule(model),
            _example_inputs(config, None, EXAMPLE_BATCH),
            _input_spec(config)[0],
            ({0: B}, {0: B}),
        )


def sequence_graph(model: TaskModel) -> onnx.ModelProto:
    """The sequence graph of a task model (see SequenceModule), as a checked ModelProto."""
    config = model.config
    B, T = torch.export.Dim("B", min=1), torch.export.Dim("T", min=1)
    with _traceable(model):
        return _to_onnx(
            SequenceModule(StepModule(model)),
            _example_inputs(config, EXAMPLE_STEPS, EXAMPLE_BATCH),
            _input_spec(config)[0],
            ({0: T, 1: B}, {0: B}),
        )


# -------------------------------------------------------------------------------------- parity
@dataclass
class Parity:
    """Largest absolute differences between onnxruntime and torch."""

    steps: int
    batch: int
    max_logit_diff: float
    max_state_diff: float

    @property
    def max_diff(self) -> float:
        return max(self.max_logit_diff, self.max_state_diff)


def _cpu_session(path_or_bytes: str | bytes, threads: int = 1):
    """An onnxruntime CPU session; threads=0 lets onnxruntime choose (one per core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_parity(
    model: TaskModel,
    graph,
    *,
    steps: int = 200,
    batch: int = 5,
    seed: int = 0,
    sequence: bool = False,
) -> Parity:
    """Run onnxruntime (CPU provider) and the torch model side by side from random inputs and a
    random state, and return the largest differences of every logit and every state value.

    graph: a path or ModelProto of the step graph (`sequence=False`: called once per step, its
    state fed back) or of the sequence graph (`sequence=True`: one call for all `steps`). The
    torch side is the model's own forward (the path training and evaluation use), one step at a
    time, its state packed with pack_state.
    """
    sess = _cpu_session(str(graph) if isinstance(graph, (str, Path)) else graph.SerializeToString())
    config = model.config
    x, state = _example_inputs(config, steps, batch, seed)
    input_name = _input_spec(config)[0]
    was_training = model.training
    model.eval()
    threads = torch.get_num_threads()
    # One thread: these are tiny sequential ops, and a second OpenMP thread that has to wait for
    # a busy core turned 200 steps of a small LSTM from 0.07 s into 9 s on a loaded 2-core box.
    torch.set_num_threads(1)
    try:
        torch_state = unpack_state(state, config)
        torch_logits, torch_states = [], []
        for t in range(steps):
            logits, torch_state = model(x[t : t + 1], torch_state)  # (1, B, V)
            torch_logits.append(logits[0].numpy())
            torch_states.append(pack_state(torch_state).numpy())
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)
    x_np, s_np = x.numpy(), state.numpy()
    dl = ds = 0.0
    if sequence:
        logits, final = sess.run(None, {input_name: x_np, STATE_INPUT: s_np})
        dl = float(np.abs(logits - np.stack(torch_logits)).max())
        ds = float(np.abs(final - torch_states[-1]).max())
    else:
        for t in range(steps):
            logits, s_np = sess.run(None, {input_name: x_np[t], STATE_INPUT: s_np})
            dl = max(dl, float(np.abs(logits - torch_logits[t]).max()))
            ds = max(ds, float(np.abs(s_np - torch_states[t]).max()))
    return Parity(steps, batch, dl, ds)


__all__ = [
    "EXAMPLE_BATCH",
    "EXAMPLE_STEPS",
    "IR_VERSION",
    "OPSET",
    "ExportError",
    "Parity",
    "SequenceModule",
    "StepModule",
    "check_parity",
    "sequence_graph",
    "step_graph",
]
