"""The hierarchical multiscale LSTM (HM-LSTM; Chung, Ahn & Bengio, 2016, section 3).

An L-layer stack where each layer but the last has a binary boundary detector z. At step t,
layer l (1-based in the paper, 0-based here) chooses from its own previous boundary
z_{t-1}^l and the boundary just emitted below it z_t^{l-1} (z_t^0 = 1: the input is never
skipped):

    UPDATE  z_{t-1}^l = 0, z_t^{l-1} = 1:  c = f * c_{t-1} + i * g,  h = o * tanh(c)
    COPY    z_{t-1}^l = 0, z_t^{l-1} = 0:  c = c_{t-1},              h = h_{t-1}
    FLUSH   z_{t-1}^l = 1:                 c = i * g,                h = o * tanh(c)

with the gates and the boundary pre-activation from eq. (4)-(7):

    [i f g o z~] = U_l h_{t-1}^l  +  z_{t-1}^l W_td h_{t-1}^{l+1}  +  z_t^{l-1} W_bu h_t^{l-1}  +  b
                   (recurrent)       (top-down, not on the last)      (bottom-up; h^0 = x_t)

i, f, o sigmoids, g tanh, z~ the hard sigmoid max(0, min(1, (a x + 1) / 2)) with slope a, and
z = 1[z~ > 0.5] in the forward pass with the straight-through estimator in the backward pass
(the gradient of the hard sigmoid). The last layer has no boundary detector (its z is 0).

Parameters of layer l (gate rows in the order i, f, g, o, then z~ on every layer but the last,
so rows = 4H + 1 or 4H):  weight_hh_l{l} (rows, H) = U,  weight_ih_l{l} (rows, in_l) = W_bu,
weight_td_l{l} (rows, H) = W_td (not on the last layer),  bias_l{l} (rows,).
Optional layer normalisation applies to each of the three terms before the sum.

The state per layer is (h, c, z) for layers with a detector and (h, c) for the last; z is a
(B, H) tensor holding the boundary broadcast over H, so that every state slot has the same
shape and the layout packs into the (B, S, H) tensor the exporter and the server carry.

`HMOutputModule` is eq. (11)-(12): per-layer scalar gates over the concatenated hidden states,
a ReLU embedding, then the (linear) softmax layer.

COPY is the saving the model promises: `skip_copy=True` (the default outside training) skips
a layer's matrix products at a step where every sequence in the batch copies. Operation counts
per layer are returned by `forward(..., return_boundaries=True)`.

This file imports only torch.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.levels import orthogonal_gates_


def hard_sigmoid(x: Tensor, slope: float) -> Tensor:
    return torch.clamp((slope * x + 1.0) / 2.0, 0.0, 1.0)


def binarize_straight_through(p: Tensor) -> Tensor:
    """1[p > 0.5] forward; gradient 1 with respect to p backward (the straight-through
    estimator)."""
    return p + ((p > 0.5).to(p.dtype) - p).detach()


def slope_schedule(epoch: int) -> float:
    """The paper's annealing: a = min(5, 1 + 0.04 * epoch)."""
    return min(5.0, 1.0 + 0.04 * epoch)


OPS = ("update", "copy", "flush")


class HMLSTM(nn.Module):
    """forward(x, state=None) -> (output (T, B, L*H), state): x of shape (T, B, input_size) or
    (T, B) integer indices of one-hot inputs; the output concatenates every layer's h (the
    output module reads them all)."""

    weight_hh_l0: Tensor  # registered with setattr (declared here for the type checker)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 3,
        layer_norm: bool = False,
        slope: float = 1.0,
    ) -> None:
        super().__init__()
        if input_size < 1 or hidden_size < 1:
            raise ValueError(
                f"input_size and hidden_size must be >= 1, got {input_size}, {hidden_size}"
            )
        if num_layers < 2:
            raise ValueError(
                f"an HM-LSTM needs num_layers >= 2 (boundaries pass upward), got {num_layers}"
            )
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.depth = 1
        self.layer_norm = layer_norm
        self.slope = slope  # the hard sigmoid's slope a; the trainer anneals it per epoch
        self.skip_copy: bool | None = None  # None: skip whole-batch COPY steps when not training
        H = hidden_size
        for n in range(num_layers):
            rows = self.rows(n)
            setattr(
                self,
                f"weight_ih_l{n}",
                nn.Parameter(torch.empty(rows, input_size if n == 0 else H)),
            )
            setattr(self, f"weight_hh_l{n}", nn.Parameter(torch.empty(rows, H)))
            if n < num_layers - 1:
                setattr(self, f"weight_td_l{n}", nn.Parameter(torch.empty(rows, H)))
            setattr(self, f"bias_l{n}", nn.Parameter(torch.empty(rows)))
        if layer_norm:

            def terms(n: int) -> int:
                return 3 if n < num_layers - 1 else 2

            self.norms = nn.ModuleList(
                nn.ModuleList(nn.LayerNorm(self.rows(n)) for _ in range(terms(n)))
                for n in range(num_layers)
            )
        self.reset_parameters()

    def rows(self, n: int) -> int:
        return 4 * self.hidden_size + (1 if n < self.num_layers - 1 else 0)

    def reset_parameters(self) -> None:
        for n in range(self.num_layers):
            w_ih = getattr(self, f"weight_ih_l{n}")
            if n == 0:
                nn.init.xavier_uniform_(w_ih)
            else:
                _orthogonal_rows_(w_ih)
            _orthogonal_rows_(getattr(self, f"weight_hh_l{n}"))
            if n < self.num_layers - 1:
                _orthogonal_rows_(getattr(self, f"weight_td_l{n}"))
            nn.init.zeros_(getattr(self, f"bias_l{n}"))

    def initial_state(self, batch_size: int, device=None, dtype=None):
        w = self.weight_hh_l0

        def z() -> Tensor:
            return torch.zeros(
                batch_size, self.hidden_size, device=device or w.device, dtype=dtype or w.dtype
            )

        return tuple(
            (z(), z(), z()) if n < self.num_layers - 1 else (z(), z())
            for n in range(self.num_layers)
        )

    # ------------------------------------------------------------------------------- one step
    def step(self, x: Tensor, state, counts: list[dict[str, int]] | None = None):
        """One time step for every layer. x: (B, in) floats or (B,) indices. Returns
        (h of every layer concatenated (B, L*H), new state, boundaries (B, L-1))."""
        H, L = self.hidden_size, self.num_layers
        skip = (not self.training) if self.skip_copy is None else self.skip_copy
        new_state, hs, zs = [], [], []
        z_below = None  # z_t^{l-1}; None means 1 (the input layer)
        h_below = x
        for n in range(L):
            h_prev, c_prev = state[n][0], state[n][1]
            z_prev = state[n][2][:, :1] if n < L - 1 else torch.zeros_like(h_prev[:, :1])  # (B, 1)
            ones = torch.ones_like(z_prev)
            zb = ones if z_below is None else z_below
            flush = z_prev  # z_{t-1}^l = 1
            update = (1 - z_prev) * zb
            copy = (1 - z_prev) * (1 - zb)
            if counts is not None:
                for name, m in zip(OPS, (update, copy, flush), strict=True):
                    counts[n][name] += int(m.detach().round().sum().item())
            if skip and not torch.is_grad_enabled() and bool((copy == 1).all()):
                # every sequence copies: the layer's state and output are unchanged, no products
                new_state.append(state[n])
                hs.append(h_prev)
                if n < L - 1:
                    zs.append(torch.zeros_like(z_prev))
                z_below, h_below = torch.zeros_like(z_prev), h_prev
                continue
            # eq. (6): the recurrent term, the top-down one gated by z_{t-1}^l, the bottom-up
            # one gated by z_t^{l-1}; each term normalised on its own (when layer_norm) before
            # its gate, so that a gate of 0 removes the term (LN of a zero vector is its bias)
            terms = [F.linear(h_prev, getattr(self, f"weight_hh_l{n}"))]
            gates: list[Tensor | None] = [None]
            if n < L - 1:
                terms.append(F.linear(state[n + 1][0], getattr(self, f"weight_td_l{n}")))
                gates.append(z_prev)
            w_ih = getattr(self, f"weight_ih_l{n}")
            if n == 0 and h_below.dtype in (torch.int64, torch.int32):
                terms.append(F.embedding(h_below, w_ih.t()))  # one-hot input: a column lookup
            else:
                terms.append(F.linear(h_below, w_ih))
            gates.append(None if z_below is None else zb)  # z_t^0 = 1: the input is never gated
            if self.layer_norm:
                norms = cast(nn.ModuleList, self.norms[n])  # level n's LayerNorms, one per term
                terms = [norm(t) for norm, t in zip(norms, terms, strict=True)]
            terms = [t if gate is None else gate * t for gate, t in zip(gates, terms, strict=True)]
            s = sum(terms) + getattr(self, f"bias_l{n}")  # (B, rows)
            i, f, g, o = (
                torch.sigmoid(s[:, :H]),
                torch.sigmoid(s[:, H : 2 * H]),
                torch.tanh(s[:, 2 * H : 3 * H]),
                torch.sigmoid(s[:, 3 * H : 4 * H]),
            )
            c_new = f * c_prev + i * g
            c_flush = i * g
            c = update * c_new + flush * c_flush + copy * c_prev  # eq. (2); one term is active
            h = (1 - copy) * (o * torch.tanh(c)) + copy * h_prev  # eq. (3)
            if n < L - 1:
                # A copying layer computes nothing (the paper's section 3.2), its boundary
                # included: its z stays 0, so COPY leaves the whole state (h, c, z) unchanged.
                z = (1 - copy) * binarize_straight_through(hard_sigmoid(s[:, 4 * H :], self.slope))
                new_state.append((h, c, z.expand(-1, H)))
                zs.append(z)
            else:
                z = None
                new_state.append((h, c))
            hs.append(h)
            z_below, h_below = z, h
        return torch.cat(hs, dim=1), tuple(new_state), torch.cat(zs, dim=1)

    def reference_step(self, x: Tensor, state):
        """One step (what the ONNX exporter traces): x (B, in) or (B,) indices -> (every layer's
        h (B, L*H), for the output module; new state). The boundaries are in the state (z)."""
        hs, new_state, _ = self.step(x, state)
        return hs, new_state

    def forward(self, x: Tensor, state=None, return_boundaries: bool = False):
        if x.dim() not in (2, 3) or (x.dim() == 2) != (x.dtype in (torch.int64, torch.int32)):
            raise ValueError(
                "x must be (T, B, input_size) floats or (T, B) integer one-hot indices, got "
                f"shape {tuple(x.shape)} of {x.dtype}"
            )
        T, B = x.shape[0], x.shape[1]
        if state is None:
            state = self.initial_state(B, device=x.device)
        counts = (
            [dict.fromkeys(OPS, 0) for _ in range(self.num_layers)] if return_boundaries else None
        )
        outs, bounds = [], []
        for t in range(T):
            out, state, z = self.step(x[t], state, counts)
            outs.append(out)
            bounds.append(z)
        output = (
            torch.stack(outs)
            if outs
            else x.new_zeros(0, B, self.num_layers * self.hidden_size, dtype=torch.float32)
        )
        if return_boundaries:
            z_all = torch.stack(bounds) if bounds else output.new_zeros(0, B, self.num_layers - 1)
            return output, state, z_all, counts
        return output, state

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"layer_norm={self.layer_norm}, slope={self.slope}"
        )


def _orthogonal_rows_(weight: Tensor) -> Tensor:
    """Orthogonal init of each gate block; the boundary row (if any) gets a small uniform init."""
    H = weight.shape[0] // 4
    with torch.no_grad():
        orthogonal_gates_(weight[: 4 * H])
        if weight.shape[0] > 4 * H:
            nn.init.uniform_(
                weight[4 * H :], -1.0 / weight.shape[1] ** 0.5, 1.0 / weight.shape[1] ** 0.5
            )
    return weight


class HMOutputModule(nn.Module):
    """Eq. (11)-(12): g^l = sigmoid(w^l [h^1; ...; h^L]); h^e = ReLU(sum_l g^l W^e_l h^l);
    then the output (softmax) layer. Input (..., L*H), output (..., out_features)."""

    def __init__(
        self, hidden_size: int, num_layers: int, embedding_size: int, out_features: int
    ) -> None:
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.gates = nn.Linear(num_layers * hidden_size, num_layers, bias=False)  # row l = w^l
        self.embed = nn.Linear(
            num_layers * hidden_size, embedding_size, bias=False
        )  # [W^e_1 ... W^e_L]
        self.out = nn.Linear(embedding_size, out_features)

    def forward(self, hs: Tensor) -> Tensor:
        H, L = self.hidden_size, self.num_layers
        g = torch.sigmoid(self.gates(hs))  # (..., L)
        gated = (hs.unflatten(-1, (L, H)) * g.unsqueeze(-1)).flatten(-2)  # g^l h^l
        return self.out(torch.relu(self.embed(gated)))  # eq. (12) has no bias
