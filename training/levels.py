"""The gate parameters of one LSTM-like level, shared by the NLSTM cell and the LSTM baseline.

A Nested LSTM cell's level k (training/nlstm.py) and a stacked LSTM's layer n
(training/baselines.py) own the same three parameters, under the same names,

    weight_ih_l{k}: (4H, in_k)   weight_hh_l{k}: (4H, H)   bias_l{k}: (4H,)

with the gates in torch.nn.LSTM's order (i, f, g, o) and one bias per gate (as the paper counts
parameters), and are initialised alike (the paper's section 4): Glorot for the first input
weights, orthogonal gate blocks for every other weight matrix, zero biases. The names are the
checkpoints' and the bundled exports' keys: they must not change.

This file imports only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def add_levels(module: nn.Module, input_sizes: list[int], hidden_size: int) -> None:
    """Register level k's weight_ih_l{k} (4H, input_sizes[k]), weight_hh_l{k} (4H, H) and
    bias_l{k} (4H,) on `module`, uninitialised (call reset_levels)."""
    H = hidden_size
    for k, in_k in enumerate(input_sizes):
        module.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(4 * H, in_k)))
        module.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * H, H)))
        module.register_parameter(f"bias_l{k}", nn.Parameter(torch.empty(4 * H)))


def level_weights(module: nn.Module, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(weight_ih, weight_hh, bias) of level k."""
    return (
        getattr(module, f"weight_ih_l{k}"),
        getattr(module, f"weight_hh_l{k}"),
        getattr(module, f"bias_l{k}"),
    )


def reset_levels(module: nn.Module, count: int, glorot_input: bool = True) -> None:
    """The paper's initialisation of levels 0..count-1: Glorot for level 0's input weights when
    `glorot_input` (the model's first input weights), orthogonal gate blocks for every other
    weight matrix, zero biases. Level by level in this order: the random draws, and so a seed's
    weights, are those of every checkpoint trained so far."""
    for k in range(count):
        w_ih, w_hh, b = level_weights(module, k)
        if k == 0 and glorot_input:
            nn.init.xavier_uniform_(w_ih)
        else:
            orthogonal_gates_(w_ih)
        orthogonal_gates_(w_hh)
        nn.init.zeros_(b)


def orthogonal_gates_(weight: Tensor) -> Tensor:
    """Orthogonal initialisation of each gate's (H, in) block of a (4H, in) weight."""
    with torch.no_grad():
        for block in weight.chunk(4, dim=0):
            nn.init.orthogonal_(block)
    return weight
