"""The Nested LSTM (Moniz & Krueger, 2018): the cell, its sequence layer and their fast path.

Notation follows the paper's section 3 (equations (1)-(15)). A cell of depth D has D levels;
level 0 is the outer LSTM, level D-1 the innermost. Each level k owns

    weight_ih_l{k}: (4H, in_k)   in_0 = input_size, in_k = H for k > 0
    weight_hh_l{k}: (4H, H)
    bias_l{k}:      (4H,)        one bias per gate, as the paper counts parameters

with the gates in torch.nn.LSTM's order (i, f, g, o). One step reads (x_t, h_{t-1}) at level 0
and, for k >= 1,

    input  u_k = i_{k-1} * g_{k-1}              (eq. 8: x~_t, a product, not a sum)
    hidden v_k = f_{k-1} * c_{k-1}(t-1)         (eq. 7: h~_{t-1})

where c_k(t-1) is level k's memory from the previous step. The memory of every level but the
innermost is the hidden *output* of the level below it (eq. 15: c_t = h~_t = o~ * tanh(c~_t),
the output itself, not tanh of it); the innermost level is a plain LSTM cell whose memory is
v + u (eq. 9's addition). Gates are sigmoids; the candidate g is the identity at level 0 (the
paper's NLSTM runs; a constructor option) and tanh deeper; every level's output uses tanh.

The recurrent state of one cell is the tuple (h, c_0, c_1, ..., c_{D-1}), each (B, H): h is the
cell's output, c_0 the outer memory, c_{D-1} the innermost memory. The same order is the slot
order of the exported step graph's state tensor and of the server's sessions.

Two paths compute the same function:
  * `NestedLSTMCell.forward`, one step, written as the equations read (the reference, and what
    the ONNX exporter traces);
  * `nested_lstm_sequence`, a whole sequence in one autograd Function with a hand-written
    backward, whose weight gradients are one GEMM each over all steps (training/nlstm_fused.py
    says how, and when C++ step kernels take its pointwise work).

The levels' parameters, their names and their initialisation are training.levels', shared with
the LSTM baseline. This file imports only torch (and training.levels and training.nlstm_fused,
which import only torch).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.levels import add_levels, level_weights, reset_levels
from training.nlstm_fused import NestedLSTMSequence

State = tuple[Tensor, ...]

ACTIVATIONS = ("identity", "tanh")


def input_projection(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x @ weight.T + bias for dense inputs (..., in); for integer inputs (...,) the one-hot
    product, computed as a lookup of weight's columns (the inputs are one-hot over `in`)."""
    if x.dtype in (torch.int64, torch.int32):
        # (..., 4H): column x of weight, i.e. weight @ one_hot(x). Gradients reach `weight`.
        return F.embedding(x, weight.t()) + bias
    return F.linear(x, weight, bias)


def sequence_projection(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """`input_projection` of a whole sequence. For one-hot inputs with at least as many positions
    as input classes it looks up columns of the table W^T + b (V, 4H) instead of adding the bias
    to every position: the same float32 sums, on V rows instead of T*B in the forward, and the
    bias gradient summed over V rows instead of T*B in the backward."""
    if x.dtype in (torch.int64, torch.int32) and x.numel() >= weight.shape[1]:
        return F.embedding(x, weight.t() + bias)
    return input_projection(x, weight, bias)


def _check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"outer_activation must be one of {ACTIVATIONS}, got {name!r}")
    return name


class NestedLSTMCell(nn.Module):
    """One Nested LSTM cell of `depth` levels (depth 1 with a tanh outer candidate is the
    classic LSTM cell).

    forward(x, state=None) -> (h, state), x of shape (B, input_size) (or (B,) integer indices of
    one-hot inputs), state the tuple (h, c_0, ..., c_{depth-1}) of (B, hidden_size) tensors;
    None means zeros.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        depth: int = 2,
        outer_activation: str = "identity",
    ) -> None:
        super().__init__()
        if input_size < 1 or hidden_size < 1:
            raise ValueError(
                f"input_size and hidden_size must be >= 1, got {input_size} and {hidden_size}"
            )
        if depth < 1:
            raise ValueError(f"depth must be >= 1 (1 is a plain LSTM cell), got {depth}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.depth = depth
        # the argument checks read tensor values; onnx_graphs._traceable turns them off
        self.checks = True
        self.outer_activation = _check_activation(outer_activation)
        add_levels(self, [input_size] + [hidden_size] * (depth - 1), hidden_size)
        self.reset_parameters()

    # The paper's section 4: Glorot for the first input weights, orthogonal for every other
    # weight matrix. Model-level code decides which cell holds "the first" input weights; a
    # cell on its own treats its level-0 input weights as the first.
    def reset_parameters(self, glorot_input: bool = True) -> None:
        reset_levels(self, self.depth, glorot_input)

    def level_weights(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        return level_weights(self, k)

    def initial_state(self, batch_size: int, device=None, dtype=None) -> State:
        if device is None:
            device = self.weight_hh_l0.device
        if dtype is None:
            dtype = self.weight_hh_l0.dtype
        return tuple(
            torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
            for _ in range(self.depth + 1)
        )

    def check_state(self, state: State, batch_size: int) -> None:
        if not self.checks:
            return
        w = self.weight_hh_l0
        if len(state) != self.depth + 1:
            raise ValueError(
                f"a depth-{self.depth} NestedLSTMCell state is (h, c_0, ..., c_{self.depth - 1}): "
                f"{self.depth + 1} tensors, got {len(state)}"
            )
        for t in state:
            if t.shape != (batch_size, self.hidden_size):
                raise ValueError(
                    f"every state tensor must have shape (B, hidden_size) = "
                    f"({batch_size}, {self.hidden_size}), got {tuple(t.shape)}"
                )
            if t.dtype != w.dtype or t.device != w.device:
                raise ValueError(
                    f"state tensors must be {w.dtype} on {w.device} like the weights, "
                    f"got {t.dtype} on {t.device}"
                )

    def check_input(self, x: Tensor, step_dims: int) -> None:
        """x must be (..., input_size) floats, or (...) integer indices in [0, input_size)."""
        if not self.checks:
            return
        if x.dtype in (torch.int64, torch.int32):
            if x.dim() != step_dims:
                raise ValueError(
                    f"integer one-hot indices must have {step_dims} dims, got {tuple(x.shape)}"
                )
            if x.numel() and (x.min() < 0 or x.max() >= self.input_size):
                raise ValueError(
                    f"one-hot indices must lie in [0, {self.input_size}), got {x.min()}..{x.max()}"
                )
        elif (
            not x.is_floating_point() or x.dim() != step_dims + 1 or x.shape[-1] != self.input_size
        ):
            raise ValueError(
                f"x must be floats of shape ({'T, ' if step_dims == 2 else ''}B, "
                f"{self.input_size}) or integer one-hot indices of shape "
                f"({'T, ' if step_dims == 2 else ''}B), "
                f"got {tuple(x.shape)} of {x.dtype}"
            )

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        self.check_input(x, step_dims=1)
        batch = x.shape[0]
        if state is None:
            state = self.initial_state(batch, device=x.device, dtype=self.weight_hh_l0.dtype)
        else:
            self.check_state(state, batch)
        h_prev, mem_prev = state[0], state[1:]
        H = self.hidden_size

        # Walk down: level k's gates from its (input, hidden) pair; what level k hands to
        # level k+1 is (i_k * g_k, f_k * c_k(t-1)).
        w_ih, w_hh, b = self.level_weights(0)
        gates = input_projection(x, w_ih, b) + F.linear(h_prev, w_hh)  # (B, 4H)
        outputs = []  # per level: its output gate (B, H)
        inp, hid = x, h_prev  # level k's (input, hidden); level 0's gates are computed above
        for k in range(self.depth):
            if k > 0:
                w_ih, w_hh, b = self.level_weights(k)
                gates = F.linear(inp, w_ih, b) + F.linear(hid, w_hh)  # (B, 4H)
            i, f, g, o = gates.split(H, dim=1)
            i, f, o = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o)
            if k > 0 or self.outer_activation == "tanh":
                g = torch.tanh(g)
            inp, hid = i * g, f * mem_prev[k]  # eqs. (8) and (7)
            outputs.append(o)

        # Walk up: the innermost memory is the LSTM update (addition); each level above takes
        # the hidden output of the level below as its memory (eq. 15).
        mem = [hid + inp]  # built innermost first: mem[0] is c_k for the k being walked
        for k in range(self.depth - 1, 0, -1):
            mem.insert(0, outputs[k] * torch.tanh(mem[0]))
        h = outputs[0] * torch.tanh(mem[0])
        return h, (h, *mem)


# -------------------------------------------------------------------------------- the fast path
def nested_lstm_sequence(
    cell: NestedLSTMCell, x: Tensor, state: State, cuda_graphs: bool = False
) -> tuple[Tensor, State]:
    """Run `cell` over x of shape (T, B, in) (or (T, B) one-hot indices) from `state`.
    Returns (output (T, B, H), final state). `cuda_graphs`: on CUDA, with gradients on, replay
    the sequence as captured CUDA graphs (training.nlstm_graphs); elsewhere it changes nothing."""
    w_ih0, w_hh0, b0 = cell.level_weights(0)
    xproj = sequence_projection(x, w_ih0, b0)  # (T, B, 4H): one GEMM (or lookup) for all steps
    inner = []
    for k in range(1, cell.depth):
        w_ih, w_hh, b = cell.level_weights(k)
        inner += [torch.cat([w_ih, w_hh], dim=1), b]  # (4H, 2H): one GEMM per step
    # The recurrence writes into preallocated float32 buffers, which autocast cannot do: under
    # autocast it runs in the parameters' dtype (the heads around it still autocast).
    with torch.autocast(device_type=x.device.type, enabled=False):
        xproj = xproj.to(w_hh0.dtype).contiguous()
        tanh_outer = cell.outer_activation == "tanh"
        if cuda_graphs and x.is_cuda and torch.is_grad_enabled():
            from training.nlstm_graphs import graphed_sequence  # imports this module

            out, *final = graphed_sequence(cell, xproj, w_hh0, inner, state, tanh_outer)
        else:
            out, *final = NestedLSTMSequence.apply(xproj, w_hh0, *inner, *state, tanh_outer)
    return out, tuple(final)


class NestedLSTM(nn.Module):
    """A (stack of) Nested LSTM layer(s), shaped like torch.nn.LSTM with batch_first=False.

    forward(x, state=None) -> (output, state): x of shape (T, B, input_size), or (T, B) integer
    indices of one-hot inputs; output (T, B, hidden_size); state a tuple with one cell state
    tuple (h, c_0, ..., c_{depth-1}) per layer. `fused=False` runs the reference cell step by
    step (slower; the same function). `cuda_graphs=True` replays the fused path as CUDA graphs
    on CUDA while training (training.nlstm_graphs; ignored on the CPU and under no_grad).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        depth: int = 2,
        num_layers: int = 1,
        outer_activation: str = "identity",
        fused: bool = True,
        cuda_graphs: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.depth, self.num_layers = depth, num_layers
        self.outer_activation = outer_activation
        self.fused = fused
        self.cuda_graphs = cuda_graphs
        self.layers = nn.ModuleList(
            NestedLSTMCell(
                input_size if n == 0 else hidden_size, hidden_size, depth, outer_activation
            )
            for n in range(num_layers)
        )
        self.reset_parameters()

    @property
    def cells(self) -> list[NestedLSTMCell]:
        """The layers as what they are (nn.ModuleList's items are plain Modules to mypy)."""
        return cast("list[NestedLSTMCell]", list(self.layers))

    def reset_parameters(self) -> None:
        # Glorot only for the first layer's input weights (the paper's section 4).
        for n, cell in enumerate(self.cells):
            cell.reset_parameters(glorot_input=(n == 0))

    def initial_state(self, batch_size: int, device=None, dtype=None) -> tuple[State, ...]:
        return tuple(c.initial_state(batch_size, device, dtype) for c in self.cells)

    def forward(self, x: Tensor, state: tuple[State, ...] | None = None):
        self.cells[0].check_input(x, step_dims=2)
        T, B = x.shape[0], x.shape[1]
        if state is None:
            state = self.initial_state(B, device=x.device)
        elif len(state) != self.num_layers:
            raise ValueError(
                f"state must hold one tuple per layer ({self.num_layers}), got {len(state)}"
            )
        finals = []
        for cell, s in zip(self.cells, state, strict=True):
            cell.check_state(s, B)
            if self.fused and T > 0:
                x, s = nested_lstm_sequence(cell, x, s, self.cuda_graphs)
            else:
                outs = []
                for t in range(T):
                    h, s = cell(x[t], s)
                    outs.append(h)
                w_hh0 = cell.level_weights(0)[1]
                x = torch.stack(outs) if outs else w_hh0.new_zeros(0, B, self.hidden_size)
            finals.append(s)
        return x, tuple(finals)

    def reference_step(
        self, x: Tensor, state: tuple[State, ...]
    ) -> tuple[Tensor, tuple[State, ...]]:
        """One step of every layer through the reference cell (what the ONNX exporter traces):
        x (B, input_size) or (B,) one-hot indices -> (the top layer's h (B, H), new state)."""
        new = []
        for cell, s in zip(self.cells, state, strict=True):
            x, s = cell(x, s)  # h (B, H), (h, c_0, ..., c_{depth-1})
            new.append(s)
        return x, tuple(new)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, depth={self.depth}, "
            f"num_layers={self.num_layers}, outer_activation={self.outer_activation!r}"
        )
