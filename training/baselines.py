"""The paper's baselines: single and stacked LSTMs with one bias per gate.

torch.nn.LSTM keeps two biases per gate (b_ih and b_hh), 8H extra parameters per layer that the
paper's Params column does not count. This LSTM owns one bias per gate,

    weight_ih_l{n}: (4H, in_n)   weight_hh_l{n}: (4H, H)   bias_l{n}: (4H,)

for layer n (gates in nn.LSTM's order i, f, g, o), and runs through the same fused kernel as
nn.LSTM (oneDNN on the CPU, cuDNN on CUDA) by handing it a constant zero b_hh: the function is
eqs. (1)-(6) of the NLSTM paper, unchanged. `fused=False` runs a reference step loop.

The state is a tuple with one (h, c) pair of (B, H) tensors per layer, the same per-layer
layout as a depth-1 NestedLSTMCell; the parameters are created and initialised by the same code
as a nested cell's levels (training.levels). This file imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.levels import add_levels, level_weights, reset_levels
from training.nlstm import State, input_projection


class LSTM(nn.Module):
    """A stack of `num_layers` LSTM layers, shaped like torch.nn.LSTM (batch_first=False).

    forward(x, state=None) -> (output, state): x of shape (T, B, input_size), or (T, B) integer
    indices of one-hot inputs; output (T, B, hidden_size); state a tuple of (h, c) per layer.
    """

    # registered by add_levels and register_buffer (declared here for the type checker)
    weight_hh_l0: Tensor
    _zero_bias: Tensor

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, fused: bool = True):
        super().__init__()
        if input_size < 1 or hidden_size < 1 or num_layers < 1:
            raise ValueError(
                "input_size, hidden_size and num_layers must be >= 1, got "
                f"{input_size}, {hidden_size}, {num_layers}"
            )
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.depth = 1  # one memory per layer: the state per layer is (h, c)
        self.fused = fused
        # layer n's parameters are a nested cell's level n's (training.levels)
        add_levels(self, [input_size] + [hidden_size] * (num_layers - 1), hidden_size)
        # The fused kernels want a second bias; a constant zero buffer computes the same function.
        self.register_buffer("_zero_bias", torch.zeros(4 * hidden_size), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The paper's section 4: Glorot for the first layer's input weights, orthogonal for the
        # rest.
        reset_levels(self, self.num_layers)

    def layer_weights(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        return level_weights(self, n)

    def initial_state(self, batch_size: int, device=None, dtype=None) -> tuple[State, ...]:
        w = self.weight_hh_l0
        z = lambda: torch.zeros(  # noqa: E731
            batch_size, self.hidden_size, device=device or w.device, dtype=dtype or w.dtype
        )
        return tuple((z(), z()) for _ in range(self.num_layers))

    def _check(self, x: Tensor, state) -> None:
        if x.dim() not in (2, 3) or (x.dim() == 2) != (x.dtype in (torch.int64, torch.int32)):
            raise ValueError(
                "x must be (T, B, input_size) floats or (T, B) integer one-hot indices, got "
                f"shape {tuple(x.shape)} of {x.dtype}"
            )
        B = x.shape[1]
        if len(state) != self.num_layers:
            raise ValueError(
                f"state must hold one (h, c) per layer ({self.num_layers}), got {len(state)}"
            )
        for s in state:
            if len(s) != 2 or any(t.shape != (B, self.hidden_size) for t in s):
                raise ValueError(
                    f"each layer's state is (h, c), each of shape ({B}, {self.hidden_size})"
                )

    def forward(self, x: Tensor, state: tuple[State, ...] | None = None):
        if state is None:
            state = self.initial_state(x.shape[1], device=x.device)
        self._check(x, state)
        if x.dim() == 2 and self.fused:
            # one-hot inputs: the fused kernel multiplies them densely (cheap for the paper's
            # vocabularies); the reference path looks the columns up instead.
            x = F.one_hot(x.long(), self.input_size).to(self.weight_hh_l0.dtype)
        if self.fused:
            return self._forward_fused(x, state)
        return self._forward_reference(x, state)

    def _forward_fused(self, x: Tensor, state):
        flat = []
        for n in range(self.num_layers):
            w_ih, w_hh, b = self.layer_weights(n)
            flat += [w_ih, w_hh, b, self._zero_bias]
        h0 = torch.stack([s[0] for s in state])  # (L, B, H)
        c0 = torch.stack([s[1] for s in state])
        # torch._VF.lstm is the kernel behind nn.LSTM.forward (same arguments).
        out, h_n, c_n = torch._VF.lstm(
            x, (h0, c0), flat, True, self.num_layers, 0.0, self.training, False, False
        )
        return out, tuple((h_n[n], c_n[n]) for n in range(self.num_layers))

    def _forward_reference(self, x: Tensor, state):
        finals = []
        for n in range(self.num_layers):
            w_ih, w_hh, b = self.layer_weights(n)
            h, c = state[n]
            xproj = input_projection(x, w_ih, b)  # (T, B, 4H); a column lookup for one-hot inputs
            outs = []
            for t in range(x.shape[0]):
                h, c = lstm_step(xproj[t], h, c, w_hh)
                outs.append(h)
            x = torch.stack(outs)
            finals.append((h, c))
        return x, tuple(finals)

    def reference_step(
        self, x: Tensor, state: tuple[State, ...]
    ) -> tuple[Tensor, tuple[State, ...]]:
        """One step of every layer through lstm_step (what the ONNX exporter traces): x
        (B, input_size) or (B,) one-hot indices -> (the top layer's h (B, H), new state)."""
        new = []
        for n in range(self.num_layers):
            w_ih, w_hh, b = self.layer_weights(n)
            xproj = input_projection(x, w_ih, b)  # (B, 4H); one-hot: a Gather of W^T's rows
            x, c = lstm_step(xproj, state[n][0], state[n][1], w_hh)
            new.append((x, c))
        return x, tuple(new)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"


def lstm_step(xproj: Tensor, h: Tensor, c: Tensor, w_hh: Tensor) -> tuple[Tensor, Tensor]:
    """Eqs. (1)-(6): one LSTM step from the input projection xproj = x W_x + b, (B, 4H)."""
    i, f, g, o = (xproj + F.linear(h, w_hh)).chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c
