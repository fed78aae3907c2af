"""Task models over any recurrent core and the model registry (ModelConfig: model_config.py).

Every recurrent core (NestedLSTM, LSTM; later HM-LSTM) answers one small interface:

    core(x, state=None) -> (output (T, B, H), state)   x: (T, B, in) floats or (T, B) indices
    core.reference_step(x, state) -> (output (B, ...), state)   one step, as the equations read
                                                      (the head's input; what export traces)
    core.initial_state(batch_size, device, dtype) -> state
    core.hidden_size, core.num_layers, core.depth

and its state is a tuple with one tuple of (B, H) tensors per layer. `state_slots(config)` names
those tensors in order ("layer0.h", "layer0.c0", ...); `pack_state` stacks them into the
(B, S, H) tensor that the exported step graph and the server's sessions carry, and
`unpack_state` reverses it. One layout everywhere.

The task heads:
  * CharLM: one-hot characters in (the paper's parameter counts imply one-hot inputs; a lookup
    into the first input weights computes the same product), a linear softmax head per step;
  * GlimpseClassifier: 49 floats per step, a 10-class linear head. It returns the logits of
    every step (the server streams them); training and the paper's figures use the last step.

This file imports only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from training.baselines import LSTM
from training.hmlstm import HMLSTM, HMOutputModule, slope_schedule

# ModelConfig lives in a module without torch (training/config.py reads it); re-exported here
from training.model_config import CORES, TASK_KINDS, ModelConfig  # noqa: F401
from training.nlstm import NestedLSTM

# The recurrent cores (the interface above)
Core = NestedLSTM | LSTM | HMLSTM


def build_core(config: ModelConfig) -> Core:
    if config.core == "hmlstm":
        return HMLSTM(
            config.in_features,
            config.hidden_size,
            num_layers=config.num_layers,
            layer_norm=config.layer_norm,
        )
    if config.core == "nlstm":
        return NestedLSTM(
            config.in_features,
            config.hidden_size,
            depth=config.depth,
            num_layers=config.num_layers,
            outer_activation=config.outer_activation,
        )
    return LSTM(config.in_features, config.hidden_size, num_layers=config.num_layers)


def layer_slots(config: ModelConfig, n: int) -> list[str]:
    """Names of layer n's state tensors, in the order of its state tuple."""
    if config.core == "nlstm" and config.depth > 1:
        return ["h"] + [f"c{k}" for k in range(config.depth)]  # outer memory first
    if config.core == "hmlstm" and n < config.num_layers - 1:
        return ["h", "c", "z"]  # z: the boundary, broadcast over the H cells
    return ["h", "c"]


def state_slots(config: ModelConfig) -> list[str]:
    """Names of the (B, H) state tensors in pack order: per layer h, then its memories
    (outer first, innermost last), then an HM-LSTM layer's boundary z."""
    return [f"layer{n}.{name}" for n in range(config.num_layers) for name in layer_slots(config, n)]


def pack_state(state: tuple[tuple[Tensor, ...], ...]) -> Tensor:
    """Per-layer state tuples -> one (B, S, H) tensor."""
    return torch.stack([t for layer in state for t in layer], dim=1)


def unpack_state(packed: Tensor, config: ModelConfig) -> tuple[tuple[Tensor, ...], ...]:
    """(B, S, H) -> per-layer state tuples, the inverse of pack_state."""
    sizes = [len(layer_slots(config, n)) for n in range(config.num_layers)]
    if packed.dim() != 3 or packed.shape[1] != sum(sizes) or packed.shape[2] != config.hidden_size:
        raise ValueError(
            f"packed state must be (B, {sum(sizes)}, {config.hidden_size}), "
            f"got {tuple(packed.shape)}"
        )
    parts, out, start = packed.unbind(1), [], 0
    for size in sizes:
        out.append(tuple(parts[start : start + size]))
        start += size
    return tuple(out)


class TaskModel(nn.Module):
    """A recurrent core and a task head (CharLM, GlimpseClassifier): what build_model returns."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.core: Core = build_core(config)
        self.head: nn.Module
        if config.core == "hmlstm":  # the HM-RNN paper's output module, eq. (11)-(12)
            self.head = HMOutputModule(
                config.hidden_size,
                config.num_layers,
                config.embedding_size or config.hidden_size,
                config.out_features,
            )
        else:
            self.head = nn.Linear(config.hidden_size, config.out_features)
            # "the final output gate" is initialised orthogonally too (the NLSTM paper, section 4)
            nn.init.orthogonal_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of each epoch: anneals an HM-LSTM's slope."""
        if isinstance(self.core, HMLSTM):
            self.core.slope = slope_schedule(epoch)

    def initial_state(self, batch_size: int, device=None, dtype=None):
        return self.core.initial_state(batch_size, device=device, dtype=dtype)

    def forward(self, x: Tensor, state=None) -> tuple[Tensor, tuple]:
        out, state = self.core(x, state)  # (T, B, H)
        return self.head(out), state  # (T, B, out_features)


class CharLM(TaskModel):
    """Character language model: tokens (T, B) int64 -> logits (T, B, vocab), state."""

    def forward(self, tokens: Tensor, state=None):
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"tokens must be (T, B) integers, got {tuple(tokens.shape)} of {tokens.dtype}"
            )
        return super().forward(tokens, state)


class GlimpseClassifier(TaskModel):
    """Glimpse classifier: glimpses (T, B, 49) -> per-step logits (T, B, classes), state.
    The prediction for a whole image is the last step's logits."""

    def forward(self, glimpses: Tensor, state=None):
        if glimpses.dim() != 3 or glimpses.shape[-1] != self.config.input_size:
            raise ValueError(
                f"glimpses must be (T, B, {self.config.input_size}) floats, "
                f"got {tuple(glimpses.shape)}"
            )
        return super().forward(glimpses, state)


def build_model(config: ModelConfig) -> TaskModel:
    """The model registry: a config value chooses the task head and the recurrent core."""
    return (CharLM if config.kind == "char" else GlimpseClassifier)(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "CharLM",
    "GlimpseClassifier",
    "ModelConfig",
    "build_model",
    "count_parameters",
    "pack_state",
    "state_slots",
    "unpack_state",
]
