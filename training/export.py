"""torch -> ONNX: the exported folder (docs/export.md).

An exported model is a folder that explains itself:

    model.onnx        one recurrent step; inputs `tokens` (B) int64 or `glimpse` (B, 49) float32
                      and `state` (B, S, H) float32; outputs `logits` (B, V) and `state_out`
                      (B, S, H). B is dynamic. The state is pack_state's layout: meta.json names
                      the S slots (state_slots). onnxruntime is stateless; its caller owns the
                      state.
    sequence.onnx     (when it is faster) the same step under an ONNX Scan: (T, B) or (T, B, 49)
                      in, (T, B, V) logits and the final state out, T and B dynamic
    tokenizer.model   the sentencepiece model (char models)
    meta.json         serving.formats.ExportMeta: the schema is owned by its reader

The graphs and their parity check are training.onnx_graphs'. Every graph is checked with
onnx.checker, and onnxruntime is compared with torch on random inputs before the folder is
published. Whether the sequence graph is faster is measured on the finished folder by
serving.runtime in a subprocess that never imports torch (`python -m training.sequence_timing`:
torch's threads would slow onnxruntime in this process and skew the comparison). The folder is
built in a temporary folder beside the target and renamed into place
(training.export_folder), so a crash never leaves a half-written export.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving.formats import (
    META_FILE,
    SEQUENCE_GRAPH,
    STEP_GRAPH,
    TOKENIZER_FILE,
    ExportMeta,
    file_sha256,
)
from training.export_folder import building, check_target, write_graph, write_meta
from training.models import ModelConfig, TaskModel, state_slots
from training.onnx_graphs import (  # noqa: F401  (re-exported: the exporter's whole interface)
    EXAMPLE_BATCH,
    EXAMPLE_STEPS,
    IR_VERSION,
    OPSET,
    ExportError,
    Parity,
    SequenceModule,
    StepModule,
    _cpu_session,
    _example_inputs,
    check_parity,
    sequence_graph,
    step_graph,
)
from training.tasks import model_kind

# Parity demanded before a folder is published (the tests demand 1e-5 over 200 steps).
PUBLISH_TOLERANCE = 1e-4
SEQUENCE_MODES = ("auto", "always", "never")


# ----------------------------------------------------------------------- the sequence timing
# The timing program (training/sequence_timing.py), run in a fresh interpreter without torch.
TIMING_COMMAND = [sys.executable, "-m", "training.sequence_timing"]
# The folder holding the `serving` and `training` packages (a checkout or site-packages).
_PACKAGES = Path(__file__).resolve().parents[1]


def time_sequence_graph(
    folder: str | os.PathLike, *, steps: int = 256, repeats: int = 3, timeout: float = 300.0
) -> dict[str, Any]:
    """Scoring `steps` inputs at batch 1 with serving.runtime on onnxruntime's CPU provider, in a
    subprocess without torch (training.sequence_timing): ExportedModel.run through the step graph
    once per input (what the runtime does without a sequence graph) against one call of the
    sequence graph. `folder` is a complete export folder with sequence.onnx (meta.json
    included). Best of `repeats`, interleaved; microseconds per step. Raises ExportError when
    the subprocess fails."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGES), env.get("PYTHONPATH")]))
    try:
        out = subprocess.run(
            [*TIMING_COMMAND, str(Path(folder).resolve()), str(steps), str(repeats)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=folder,
            env=env,
            check=False,
        )
        if out.returncode != 0:
            raise ExportError(
                # the exception's own line (a traceback's last) first: meta.json keeps one line
                f"the sequence-graph timing subprocess failed (exit {out.returncode}): "
                f"{(out.stderr.strip().splitlines() or [''])[-1][:300]}\n"
                f"{out.stderr.strip()[-1000:]}"
            )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        loop_us, seq_us = result["loop_s"] / steps * 1e6, result["sequence_s"] / steps * 1e6
        speedup = loop_us / seq_us
    except (
        OSError,
        subprocess.TimeoutExpired,
        ValueError,
        IndexError,
        KeyError,
        TypeError,
        ZeroDivisionError,
    ) as exc:
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
        k: v
        for k, v in metrics.items()
        if k.startswith(("valid_", "test_")) and not k.endswith("_per_s")
    }
    best = {
        k[len("best_") :]: v
        for k, v in metrics.items()
        if k.startswith(("best_valid_", "best_test_"))
    }
    when = ("best_epoch", "best_step") if best else ("epoch", "step")
    figures.update(best)
    figures.update({k: metrics[k] for k in when if k in metrics})
    return _json_safe(figures)


# -------------------------------------------------------------------------------- the folder
def export_model(
    model: TaskModel,
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
    failed measurement ships nothing); "always" ships it regardless; "never" skips it. Before
    publishing, onnxruntime must match torch over `parity_steps` random steps (within 1e-4).
    An existing export at out_dir is replaced; any
    other non-empty folder is refused. Returns the written ExportMeta. `progress(text)` hears
    what the export is doing (tracing, checking parity, timing: tens of seconds in all).
    """
    say = progress or (lambda _text: None)
    if sequence not in SEQUENCE_MODES:
        raise ValueError(f"sequence must be one of {SEQUENCE_MODES}, got {sequence!r}")
    config: ModelConfig = model.config
    kind = model_kind(config.kind)
    kind.check_tokenizer(config, tokenizer)
    out_dir = Path(out_dir)
    check_target(out_dir)
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
            depth=model.core.depth,  # levels per layer: 1 for an LSTM (or HM-LSTM) layer
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            outer_activation=getattr(model.core, "outer_activation", "tanh"),
            **kind.meta_fields(config),  # vocab_size, input_size, num_classes
            input_name=kind.input_spec[0],
            input_dtype=kind.input_spec[1],
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

    with building(out_dir) as tmp:
        write_graph(step_proto, tmp / STEP_GRAPH)
        if seq_proto is not None:
            write_graph(seq_proto, tmp / SEQUENCE_GRAPH)
        if tokenizer is not None:
            (tmp / TOKENIZER_FILE).write_bytes(tokenizer)
        if seq_proto is not None:
            # Timed on the folder itself, loaded by serving.runtime as a server would load it
            # (a provisional meta.json that ships the sequence graph, replaced below).
            write_meta(make_meta(hashes(tmp), True, {}), tmp / META_FILE)
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
        write_meta(meta, tmp / META_FILE)
        say(f"writing {out_dir}")
    return meta


def export_checkpoint(
    checkpoint_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    sequence: str = "auto",
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
        source={
            "checkpoint": Path(checkpoint_path).name,
            "step": ckpt.step,
            "epoch": ckpt.epoch,
            "trained_on": ckpt.extra.get("hardware"),
        },
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
