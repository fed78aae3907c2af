"""torch -> ONNX: the step graph, the sequence graph, the exported folder, and a parity check.

An exported model is a folder that explains itself (docs/export.md):

    model.onnx        one recurrent step; inputs `tokens` (B) int64 or `glimpse` (B, 49) float32
                      and `state` (B, S, H) float32; outputs `logits` (B, V) and `state_out`
                      (B, S, H). B is dynamic. The state is pack_state's layout: meta.json names
                      the S slots (state_slots). onnxruntime is stateless; its caller owns the state.
    sequence.onnx     (when it is faster) the same step under an ONNX Scan: (T, B) or (T, B, 49)
                      in, (T, B, V) logits and the final state out, T and B dynamic
    tokenizer.model   the sentencepiece model (char models)
    meta.json         serving.formats.ExportMeta: the schema is owned by its reader

How the graphs are made. The step graph is the *reference* step of each core, traced by
torch.export (`torch.onnx.export(dynamo=True)`, the exporter torch >= 2.9 recommends; the legacy
TorchScript exporter still works in torch 2.13 but is deprecated): NestedLSTMCell.forward for
NLSTM layers, baselines.lstm_step for LSTM layers, HMLSTM.step for HM-LSTMs (with its
whole-batch COPY shortcut off: a data-dependent branch; the values are the same). So the nested
cell comes out unrolled into plain Gemm / Sigmoid / Tanh / Mul / Add operators, never the fused
autograd Function the trainer runs. For char models the one-hot product is a Gather of the first
input weight's transpose (the cell computes it as F.embedding(tokens, W.t()); the exporter folds
the transpose into the initializer). The sequence graph wraps the
same step in torch's scan operator, which the exporter turns into an ONNX Scan: a Python loop
would be unrolled to the example's length instead.

Every graph is checked with onnx.checker, and onnxruntime is compared with torch on random inputs
before the folder is published. Whether the sequence graph is faster is measured on the finished
folder by serving.runtime in a subprocess that never imports torch (torch's threads would slow
onnxruntime in this process and skew the comparison). The folder is built in a temporary folder beside the target and
renamed into place, so a crash never leaves a half-written export.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from serving.formats import (
    CHAR_INPUT,
    EXPORT_FORMAT,
    GLIMPSE_INPUT,
    LOGITS_OUTPUT,
    META_FILE,
    SEQUENCE_GRAPH,
    STATE_INPUT,
    STATE_OUTPUT,
    STEP_GRAPH,
    TOKENIZER_FILE,
    ExportMeta,
    Tokenizer,
    file_sha256,
)
from training.baselines import lstm_step
from training.checkpoint import umask_mode
from training.models import ModelConfig, pack_state, state_slots, unpack_state
from training.quantize import drop_initializer_value_info

if TYPE_CHECKING:
    import onnx

# Opset 18 and IR version 9: every operator used here (Gather, Gemm, Split, Slice, Squeeze,
# Unsqueeze, Concat, Sigmoid, Tanh, Mul, Add, Scan) has CPU and CUDA kernels in onnxruntime, and
# onnxruntime >= 1.15 reads IR 9 (onnx 1.23 would write IR 14, which onnxruntime 1.31 refuses).
OPSET = 18
IR_VERSION = 9
# Example sizes for tracing; B and T are dynamic axes, so any other size runs (the tests check).
EXAMPLE_BATCH, EXAMPLE_STEPS = 2, 3
# Parity demanded before a folder is published (the tests demand 1e-5 over 200 steps).
PUBLISH_TOLERANCE = 1e-4
SEQUENCE_MODES = ("auto", "always", "never")


class ExportError(RuntimeError):
    """The exporter produced a graph that fails the checker or disagrees with torch."""


# ---------------------------------------------------------------------------- the step modules
class StepModule(nn.Module):
    """One recurrent step of a task model with the state packed into one tensor.

    forward(x, state) -> (logits, state_out)
      x      (B,) int64 token ids (char models) or (B, input_size) float32 glimpses
      state  (B, S, H) float32, slots as state_slots(config)
      logits (B, V or classes), state_out (B, S, H)

    It runs each layer's reference step (NestedLSTMCell.forward, baselines.lstm_step,
    HMLSTM.step) with the model's own parameters, so it computes exactly what the model's
    forward computes per step.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config: ModelConfig = model.config

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        core = self.model.core
        if self.config.core == "hmlstm":
            # HMLSTM.step is its reference step; it returns every layer's h, (B, L*H), for the
            # output module, and the boundaries (B, L-1), which the state already holds as z.
            # The annealed slope a is not needed: z = 1[hard_sigmoid(a s) > 0.5] = 1[s > 0].
            hs, new_layers, _ = core.step(x, unpack_state(state, self.config))
            return self.model.head(hs), pack_state(new_layers)
        inp = x
        new_state = []
        for n, layer_state in enumerate(unpack_state(state, self.config)):
            if self.config.core == "nlstm":
                inp, layer_state = core.layers[n](inp, layer_state)  # h (B, H), (h, c_0, ...)
            else:
                w_ih, w_hh, b = core.layer_weights(n)
                if inp.dtype == torch.int64:
                    xproj = F.embedding(inp, w_ih.t()) + b  # one-hot @ W^T: a Gather, (B, 4H)
                else:
                    xproj = F.linear(inp, w_ih, b)  # (B, 4H)
                inp, c = lstm_step(xproj, layer_state[0], layer_state[1], w_hh)
                layer_state = (inp, c)
            new_state.append(layer_state)
        return self.model.head(inp), pack_state(tuple(new_state))  # (B, V), (B, S, H)


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
    cells = [m for m in model.modules() if hasattr(m, "check_input") and hasattr(m, "check_state")]
    for cell in cells:
        cell.check_input = lambda *a, **k: None  # instance attributes shadow the methods
        cell.check_state = lambda *a, **k: None
    # An HM-LSTM skips a layer's products when the whole batch copies: a data-dependent branch
    # that a graph cannot hold. Off, the step computes the same values (COPY keeps the state).
    skippers = [(m, m.skip_copy) for m in model.modules() if hasattr(m, "skip_copy")]
    for m, _ in skippers:
        m.skip_copy = False
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for cell in cells:
            del cell.check_input, cell.check_state
        for m, value in skippers:
            m.skip_copy = value
        model.train(was_training)


def _example_inputs(config: ModelConfig, steps: int | None, batch: int, seed: int = 0):
    """Random inputs and a random state: (x, state). x is (B,)/(B, in), or with steps (T, B)/(T, B, in)."""
    g = torch.Generator().manual_seed(seed)
    lead = (batch,) if steps is None else (steps, batch)
    if config.kind == "char":
        x = torch.randint(0, config.vocab_size, lead, generator=g)
    else:
        x = torch.rand(*lead, config.input_size, generator=g)
    S = len(state_slots(config))
    state = torch.randn(batch, S, config.hidden_size, generator=g) * 0.5
    return x, state


def _input_spec(config: ModelConfig) -> tuple[str, str]:
    return CHAR_INPUT if config.kind == "char" else GLIMPSE_INPUT


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


def step_graph(model: nn.Module) -> onnx.ModelProto:
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


def sequence_graph(model: nn.Module) -> onnx.ModelProto:
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


def _save_proto(proto, path: Path) -> None:
    """One self-contained file: every initializer inside (protobuf's 2 GB limit is far off)."""
    data = proto.SerializeToString()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
def check_parity(model: nn.Module, graph, *, steps: int = 200, batch: int = 5, seed: int = 0,
                 sequence: bool = False) -> Parity:
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


# Run by time_sequence_graph in a fresh interpreter that imports serving.runtime and never torch:
# torch's thread pools, loaded in the exporting process, slow onnxruntime 2.5-3.5x and would
# skew the comparison. argv: folder, steps, repeats. Prints one JSON line.
TIMING_SCRIPT = r"""
import json, sys, time
import numpy as np
from serving.runtime import ExportedModel, load_model
folder, steps, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seq = load_model(folder, providers="cpu", intra_op_threads=0, inter_op_threads=1)
# the same step session without the sequence graph: what load_model gives a folder without one,
# whose run() calls the step graph once per input
loop = ExportedModel(seq.folder, seq.meta, seq.tokenizer, seq._step, None)
rng = np.random.default_rng(0)
if seq.kind == "char":
    x = rng.integers(0, seq.output_size, size=(steps, 1))  # (T, 1)
else:
    x = rng.random((steps, 1, seq.meta.input_size), dtype=np.float32)  # (T, 1, 49)
loop_s, seq_s = [], []
for _ in range(repeats + 1):  # the first round warms both up and is dropped
    t0 = time.perf_counter()
    loop.run(x)
    t1 = time.perf_counter()
    seq.run(x)
    t2 = time.perf_counter()
    loop_s.append(t1 - t0)
    seq_s.append(t2 - t1)
print(json.dumps({
    "loop_s": min(loop_s[1:]), "sequence_s": min(seq_s[1:]),
    "torch": "torch" in sys.modules,
    "training": any(k == "training" or k.startswith("training.") for k in sys.modules),
}))
"""
# The folder holding the `serving` and `training` packages (a checkout or site-packages).
_PACKAGES = Path(__file__).resolve().parents[1]


def time_sequence_graph(folder: str | os.PathLike, *, steps: int = 256, repeats: int = 3,
                        timeout: float = 300.0) -> dict[str, Any]:
    """Scoring `steps` inputs at batch 1 with serving.runtime on onnxruntime's CPU provider, in a
    subprocess without torch: ExportedModel.run through the step graph once per input (what the
    runtime does without a sequence graph) against one call of the sequence graph. `folder` is a
    complete export folder with sequence.onnx (meta.json included). Best of `repeats`,
    interleaved; microseconds per step. Raises ExportError when the subprocess fails."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGES), env.get("PYTHONPATH")]))
    try:
        out = subprocess.run(
            [sys.executable, "-c", TIMING_SCRIPT, str(folder), str(steps), str(repeats)],
            capture_output=True, text=True, timeout=timeout, cwd=folder, env=env, check=False,
        )
        if out.returncode != 0:
            raise ExportError(
                # the exception's own line (a traceback's last) first: meta.json keeps one line
                f"the sequence-graph timing subprocess failed (exit {out.returncode}): "
                f"{(out.stderr.strip().splitlines() or [''])[-1][:300]}\n{out.stderr.strip()[-1000:]}"
            )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        loop_us, seq_us = result["loop_s"] / steps * 1e6, result["sequence_s"] / steps * 1e6
        speedup = loop_us / seq_us
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError, KeyError, TypeError,
            ZeroDivisionError) as exc:
        raise ExportError(f"the sequence-graph timing subprocess failed: {exc!r}") from None
    return {
        "what": "scoring at batch 1 with serving.runtime on the onnxruntime CPU provider, in a "
                "subprocess without torch",
        "steps": steps,
        "step_graph_loop_us_per_step": round(loop_us, 2),
        "sequence_graph_us_per_step": round(seq_us, 2),
        "speedup": round(speedup, 3),
        "torch_loaded": bool(result["torch"]),
        "training_loaded": bool(result["training"]),
    }


# ------------------------------------------------------------------------------------ metadata
def _json_safe(value: Any) -> Any:
    """Plain JSON values: tensors and numpy scalars become numbers, non-finite floats None."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def training_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """The valid and test figures at the best epoch, from a checkpoint's metrics.

    The trainer's checkpoints carry its latest evaluation record: that epoch's `valid_bpc`,
    `test_bpc` (`_ppl`, `_nll`, `_acc` for other tasks) and, when it tracks them,
    `best_valid_<figure>` / `best_test_<figure>` (the test figure at the epoch of best
    validation, as the paper reports it) with `best_epoch` and `best_step`. The best figures
    win; without them the record's own valid_* / test_* figures and its epoch are used.
    """
    figures = {
        k: v for k, v in metrics.items() if k.startswith(("valid_", "test_")) and not k.endswith("_per_s")
    }
    best = {k[len("best_"):]: v for k, v in metrics.items() if k.startswith(("best_valid_", "best_test_"))}
    when = ("best_epoch", "best_step") if best else ("epoch", "step")
    figures.update(best)
    figures.update({k: metrics[k] for k in when if k in metrics})
    return _json_safe(figures)


# -------------------------------------------------------------------------------- the folder
def _is_export_folder(path: Path) -> bool:
    try:
        return json.loads((path / META_FILE).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise FileExistsError(f"{out_dir} exists and is not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _is_export_folder(out_dir):
        raise FileExistsError(
            f"{out_dir} is a folder that is not an exported model (no nlstm {META_FILE}); "
            "refusing to replace it: choose another --out or remove it"
        )


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder into place. A previous export is renamed aside first and removed
    last, so at every moment out_dir is either the old export, absent, or the new one."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "export")
    os.replace(tmp, out_dir)
    try:
        fd = os.open(out_dir.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    task: str,
    tokenizer: bytes | None,
    metrics: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    sequence: str = "auto",
    parity_steps: int = 16,
    progress: Callable[[str], None] | None = None,
) -> ExportMeta:
    """Export a task model (training.models.build_model) to the folder `out_dir`.

    sequence: "auto" exports the sequence graph and ships it when it scores faster than the
    step graph called per step, as measured by time_sequence_graph in a subprocess without
    torch on the finished temporary folder (the measurement goes into meta.json either way; a
    failed measurement ships nothing); "always" ships it regardless; "never" skips it. Before publishing, onnxruntime must match torch over
    `parity_steps` random steps (within 1e-4). An existing export at out_dir is replaced; any
    other non-empty folder is refused. Returns the written ExportMeta. `progress(text)` hears
    what the export is doing (tracing, checking parity, timing: tens of seconds in all).
    """
    say = progress or (lambda _text: None)
    if sequence not in SEQUENCE_MODES:
        raise ValueError(f"sequence must be one of {SEQUENCE_MODES}, got {sequence!r}")
    config: ModelConfig = model.config
    if config.kind == "char":
        if tokenizer is None:
            raise ValueError(
                "a char model is exported with its tokenizer (the checkpoint has none): the "
                "vocabulary must travel with the weights"
            )
        vocab = Tokenizer.from_bytes(tokenizer).vocab_size
        if vocab != config.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab} symbols but the model's vocab_size is {config.vocab_size}"
            )
    out_dir = Path(out_dir)
    _check_target(out_dir)
    model = copy.deepcopy(model).cpu().float()  # the caller's model stays where it was

    say("tracing the step graph (torch.onnx.export, dynamo)")
    step_proto = step_graph(model)
    say(f"checking the step graph on onnxruntime against torch ({parity_steps} steps)")
    parity = check_parity(model, step_proto, steps=parity_steps, batch=3)
    if not parity.max_diff <= PUBLISH_TOLERANCE:
        raise ExportError(f"onnxruntime and torch disagree on the step graph: {parity}")

    timing: dict[str, Any] = {}
    seq_proto = None
    if sequence != "never":
        try:
            say("tracing the sequence graph (one Scan over the whole sequence)")
            seq_proto = sequence_graph(model)
            say("checking the sequence graph on onnxruntime against torch")
            sp = check_parity(model, seq_proto, steps=parity_steps + 1, batch=3, sequence=True)
            if not sp.max_diff <= PUBLISH_TOLERANCE:
                raise ExportError(f"onnxruntime and torch disagree on the sequence graph: {sp}")
        except ExportError as exc:
            if sequence == "always":
                raise
            seq_proto, timing = None, {"error": str(exc).splitlines()[0][:300]}

    def make_meta(files: dict[str, str], shipped: bool, timing: dict[str, Any]) -> ExportMeta:
        import onnx

        return ExportMeta(
            task=task,
            kind=config.kind,
            core=config.core,
            depth=config.depth if config.core == "nlstm" else 1,  # an LSTM layer: depth 1
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            outer_activation=config.outer_activation if config.core == "nlstm" else "tanh",
            vocab_size=config.vocab_size if config.kind == "char" else None,
            input_size=config.input_size if config.kind == "glimpse" else None,
            num_classes=config.num_classes if config.kind == "glimpse" else None,
            input_name=_input_spec(config)[0],
            input_dtype=_input_spec(config)[1],
            state_slots=state_slots(config),
            files=files,
            sequence_graph=shipped,
            opset=OPSET,
            ir_version=IR_VERSION,
            figures=training_figures(metrics or {}),
            metrics=_json_safe(metrics or {}),
            train_config=_json_safe(train_config or {}),
            model_config=_json_safe(config.to_dict()),
            sequence_timing=_json_safe(timing),
            source=_json_safe(
                {
                    **(source or {}),
                    "parity_max_diff": parity.max_diff,
                    "exporter": "torch.onnx.export(dynamo=True)",
                    "torch": torch.__version__,
                    "onnx": onnx.__version__,
                }
            ),
        )

    def hashes(folder: Path) -> dict[str, str]:
        return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.name != META_FILE}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(umask_mode(0o777))  # mkdtemp's folder is private (0700); an export is not
    try:
        _save_proto(step_proto, tmp / STEP_GRAPH)
        if seq_proto is not None:
            _save_proto(seq_proto, tmp / SEQUENCE_GRAPH)
        if tokenizer is not None:
            (tmp / TOKENIZER_FILE).write_bytes(tokenizer)
        if seq_proto is not None:
            # Timed on the folder itself, loaded by serving.runtime as a server would load it
            # (a provisional meta.json that ships the sequence graph, replaced below).
            _write_meta(make_meta(hashes(tmp), True, {}), tmp / META_FILE)
            say("timing the sequence graph against the step graph (kept only if faster)")
            try:
                timing = time_sequence_graph(tmp)
            except ExportError as exc:  # no measurement: "auto" ships only what measured faster
                timing = {"error": str(exc).splitlines()[0][:300]}
            if sequence == "auto" and not timing.get("speedup", 0.0) > 1.0:
                (tmp / SEQUENCE_GRAPH).unlink()
                seq_proto = None
        if sequence != "never":
            timing["shipped"] = seq_proto is not None
            timing["mode"] = sequence
        meta = make_meta(hashes(tmp), seq_proto is not None, timing)
        _write_meta(meta, tmp / META_FILE)
        _check_target(out_dir)  # again: something may have appeared there meanwhile
        say(f"writing {out_dir}")
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _write_meta(meta: ExportMeta, path: Path) -> None:
    with open(path, "w") as f:
        f.write(meta.to_json())
        f.flush()
        os.fsync(f.fileno())


def export_checkpoint(
    checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike, *, sequence: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> ExportMeta:
    """Export a checkpoint written by training.checkpoint.save_checkpoint (see export_model)."""
    from training.checkpoint import load_checkpoint

    if progress is not None:
        progress(f"reading {checkpoint_path}")
    ckpt = load_checkpoint(checkpoint_path)
    return export_model(
        ckpt.build_model(),
        out_dir,
        task=ckpt.task,
        tokenizer=ckpt.tokenizer,
        metrics=ckpt.metrics,
        train_config=ckpt.train_config,
        source={"checkpoint": Path(checkpoint_path).name, "step": ckpt.step, "epoch": ckpt.epoch,
                "trained_on": ckpt.extra.get("hardware")},
        sequence=sequence,
        progress=progress,
    )


__all__ = [
    "ExportError",
    "Parity",
    "SequenceModule",
    "StepModule",
    "check_parity",
    "export_checkpoint",
    "export_model",
    "sequence_graph",
    "step_graph",
    "time_sequence_graph",
    "training_figures",
]
