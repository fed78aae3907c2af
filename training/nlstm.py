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
    backward. A Python loop of cells leaves autograd to record ~20 small ops per step and to
    multiply every weight gradient one time step at a time. The Function instead saves the
    gate activations, runs the recurrence into preallocated buffers, and in the backward pass
    computes each weight gradient as ONE GEMM over all T*B positions (as cuDNN does for LSTMs);
    only the data gradients (B x 4H times 4H x 2H) stay inside the time loop. On the CPU each
    step's pointwise work between those products (activations, memory updates, derivatives)
    runs as one C++ kernel per level when training.nlstm_native could build them, else as
    separate torch ops (the same math, written out below).

The levels' parameters, their names and their initialisation are training.levels', shared with
the LSTM baseline. This file imports only torch (and training.gemm, training.levels and
training.nlstm_native, which import only torch).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from training import nlstm_native
from training.gemm import StepLinear, weight_grad
from training.levels import add_levels, level_weights, orthogonal_gates_, reset_levels  # noqa: F401

State = tuple[Tensor, ...]

ACTIVATIONS = ("identity", "tanh")


def input_projection(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x @ weight.T + bias for dense inputs (..., in); for integer inputs (...,) the one-hot
    product, computed as a lookup of weight's columns (the inputs are one-hot over `in`)."""
    if x.dtype in (torch.int64, torch.int32):
        # (..., 4H): column x of weight, i.e. weight @ one_hot(x). Gradients reach `weight`.
        return F.embedding(x, weight.t()) + bias
    return F.linear(x, weight, bias)


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
def sequence_forward(
    xproj: Tensor, w_hh0: Tensor, inner: list[Tensor], state0: list[Tensor], tanh_outer: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """The recurrence of `_NestedLSTMSequence` (see there for the arguments), into fresh buffers.

    Returns (outputs, saved): outputs = [hs (T, B, H), h_T, c_0(T), ..., c_{D-1}(T)], saved =
    what `sequence_backward` reads. Every per-step tensor is row-major (B, features) inside a
    (T, B, features) buffer: step t is one contiguous block, the step's products are
    (B, K) @ (K, 4H) on a weight prepared once (training.gemm: oneDNN on the CPU), and the weight
    gradients read each buffer as (T*B, features) without copying it.
    """
    D = len(state0) - 1
    # level k's [weight_ih | weight_hh], (4H, 2H), and bias (4H,); level 0's input weight is
    # already in xproj, so w[0] is its recurrent weight and b[0] is None
    w = [w_hh0, *inner[0::2]]
    b: list[Tensor | None] = [None, *inner[1::2]]
    T, B, H4 = xproj.shape
    H = H4 // 4
    new = xproj.new_empty

    hs = new(T + 1, B, H)  # hs[t+1] = h_t; hs[0] = h0
    hs[0] = state0[0]
    # gates[k][t]: level k's activated gates at step t, (B, 4H), the product's own output
    # (copying it into one (T, B, 4H) buffer cost a pass per step, and nothing needs it flat)
    gates: list[list[Tensor]] = [[] for _ in range(D)]  # appended in step order
    mems = [new(T + 1, B, H) for _ in range(D)]  # mems[k][t+1] = c_k(t)
    tanh_mems = [new(T, B, H) for _ in range(D)]
    # level k's [u, v]; level 0 reads xproj instead, so uv[0] is an empty placeholder
    uv = [new(0)] + [new(T, B, 2 * H) for _ in range(D - 1)]
    for k in range(D):
        mems[k][0] = state0[k + 1]
    lin = [StepLinear(w_hh0, B)] + [StepLinear(w[k], B, b[k]) for k in range(1, D)]
    cpp = nlstm_native.usable(xproj)  # the C++ step kernels, or None: the torch ops below
    tanh_g = [k > 0 or tanh_outer for k in range(D)]  # whether level k's candidate is tanh

    for t in range(T):
        for k in range(D):
            # k = 0: (B, 4H) = xproj[t] + h_{t-1} W_hh0^T; k > 0: [u, v] W_k^T + b_k
            G = lin[0](hs[t], add=xproj[t]) if k == 0 else lin[k](uv[k][t])
            gates[k].append(G)
            if cpp is not None:  # the same math as the ops below, one pass per level
                if k + 1 < D:
                    cpp.down(G, mems[k][t], uv[k + 1][t], tanh_g[k])
                else:
                    tm = [x[t] for x in tanh_mems]
                    g_t = [level[t] for level in gates]
                    cpp.up(g_t, mems[k][t], tanh_g[k], [m[t + 1] for m in mems], tm, hs[t + 1])
                continue
            G[:, : 2 * H].sigmoid_()
            G[:, 3 * H :].sigmoid_()
            if k > 0 or tanh_outer:
                G[:, 2 * H : 3 * H].tanh_()
            i, f, g = G[:, :H], G[:, H : 2 * H], G[:, 2 * H : 3 * H]
            if k + 1 < D:
                nxt = uv[k + 1][t]
                torch.mul(i, g, out=nxt[:, :H])  # u_{k+1} = i_k * g_k
                torch.mul(f, mems[k][t], out=nxt[:, H:])  # v_{k+1} = f_k * c_k(t-1)
            else:
                # innermost: c(t) = f * c(t-1) + i * g
                torch.addcmul(torch.mul(f, mems[k][t]), i, g, out=mems[k][t + 1])
        if cpp is not None:
            continue  # the innermost level's kernel walked up already
        for k in range(D - 1, -1, -1):
            tc = torch.tanh(mems[k][t + 1], out=tanh_mems[k][t])
            out = mems[k - 1][t + 1] if k > 0 else hs[t + 1]
            torch.mul(gates[k][t][:, 3 * H :], tc, out=out)

    saved = [w_hh0, *w[1:], hs, *mems, *tanh_mems, *uv[1:], *[G for level in gates for G in level]]
    # copies, never views of the saved buffers: a caller may change its outputs in place
    # (autograd would not notice the backward's inputs changing), and a carried state must not
    # keep the buffers alive
    return [hs[1:].clone(), *[x.clone() for x in [hs[T]] + [m[T] for m in mems]]], saved


def sequence_backward(
    saved: list[Tensor],
    d_hs: Tensor | None,
    d_hT: Tensor | None,
    d_cT: list[Tensor | None],
    tanh_outer: bool,
) -> list[Tensor]:
    """The gradients of `sequence_forward`'s inputs (xproj, w_hh0, w_1, b_1, ..., h0, c0_0, ...)
    from those of its outputs (None: zero) and what it saved."""
    D = len(d_cT)
    w_hh0 = saved[0]
    w = [w_hh0, *saved[1:D]]  # as in sequence_forward: w[k] is level k's weight
    hs = saved[D]
    mems = list(saved[D + 1 : 2 * D + 1])
    tanh_mems = list(saved[2 * D + 1 : 3 * D + 1])
    uv = [hs.new_empty(0), *saved[3 * D + 1 : 4 * D]]  # uv[0]: a placeholder, as in the forward
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    gates = [saved[4 * D + k * T : 4 * D + (k + 1) * T] for k in range(D)]  # [k][t]: (B, 4H)

    def start(d):  # a working copy, never a view: the loop updates it in place, and autograd
        # may hand one buffer to several outputs
        return (
            d.clone(memory_format=torch.contiguous_format) if d is not None else hs.new_zeros(B, H)
        )

    d_gates = [hs.new_empty(T, B, 4 * H) for _ in range(D)]  # grads of pre-activations
    dh = start(d_hT)
    # dc[k]: gradient flowing into c_k(t) from later steps (through f_k * c_k(t))
    dc = [start(d) for d in d_cT]
    act_grad = hs.new_empty(B, 4 * H)  # derivative of each gate's activation
    dmem = hs.new_empty(B, H)
    ones = hs.new_ones(B, H)
    # d_in = dA @ W at every step: a StepLinear over W^T (prepared once, as in the forward)
    lin_t = [StepLinear(w_hh0.t(), B)] + [StepLinear(w[k].t(), B) for k in range(1, D)]
    cpp = nlstm_native.usable(hs)  # the C++ step kernels, or None: the torch ops below
    if cpp is not None and d_hs is not None:
        d_hs = d_hs.contiguous()  # the kernels read rows; autograd may hand in any strides

    for t in range(T - 1, -1, -1):
        if cpp is not None:  # the same math as the ops below: one pass per level and step
            g_t = [level[t] for level in gates]
            dA_t = [d[t] for d in d_gates]
            d_hs_t = None if d_hs is None else d_hs[t]
            tm = [x[t] for x in tanh_mems]
            cpp.back_inner(dh, d_hs_t, g_t, tm, dc, dA_t, mems[D - 1][t], D > 1 or tanh_outer)
            for k in range(D - 1, 0, -1):  # level k's dA is complete: [d u, d v] for k - 1
                tanh_g = k > 1 or tanh_outer
                cpp.back_level(
                    lin_t[k](dA_t[k]), g_t[k - 1], mems[k - 1][t], dA_t[k - 1], dc[k - 1], tanh_g
                )
            dh = lin_t[0](dA_t[0])  # (B, H): into h_{t-1}
            continue
        if d_hs is not None:
            dh += d_hs[t]
        # Walk down the output chain h = o_0 tanh(c_0), c_{k-1} = o_k tanh(c_k): each
        # level's d o_k, and the total gradient of each memory c_k(t) into dc[k].
        d_out = dh
        for k in range(D):
            o, tc = gates[k][t][:, 3 * H :], tanh_mems[k][t]
            torch.mul(d_out, tc, out=d_gates[k][t][:, 3 * H :])  # d o_k
            torch.addcmul(ones, tc, tc, value=-1.0, out=dmem).mul_(o)  # o (1 - tanh^2 c)
            dc[k].addcmul_(dmem, d_out)
            d_out = dc[k]
        # Walk back up. The innermost memory is c = v + u with u = i*g, v = f*c(t-1); a
        # level k above it hands (u_{k+1}, v_{k+1}) = (i_k*g_k, f_k*c_k(t-1)) down, whose
        # gradients come from level k+1's pre-activation gradient times W_{k+1}.
        d_u = d_v = dc[D - 1]
        for k in range(D - 1, -1, -1):
            G, dA = gates[k][t], d_gates[k][t]
            i, f, g = G[:, :H], G[:, H : 2 * H], G[:, 2 * H : 3 * H]
            torch.mul(d_u, g, out=dA[:, :H])  # d i
            torch.mul(d_v, mems[k][t], out=dA[:, H : 2 * H])  # d f
            torch.mul(d_u, i, out=dA[:, 2 * H : 3 * H])  # d g
            torch.mul(d_v, f, out=dc[k])  # carried into c_k(t-1) (d_v is dc[k] innermost: last use)
            # sigmoid' = s (1 - s); tanh' = 1 - g^2; identity' = 1
            torch.addcmul(G, G, G, value=-1.0, out=act_grad)  # s - s^2 (g block fixed below)
            ag = act_grad[:, 2 * H : 3 * H]
            if k > 0 or tanh_outer:
                torch.addcmul(ones, g, g, value=-1.0, out=ag)
            else:
                ag.fill_(1.0)
            dA.mul_(act_grad)
            if k > 0:
                d_uv = lin_t[k](dA)  # (B, 2H)
                d_u, d_v = d_uv[:, :H], d_uv[:, H:]
        dh = lin_t[0](d_gates[0][t])  # (B, H): into h_{t-1}

    # Weight gradients: one product each over all T*B positions, on (T*B, features) views.
    def flat(x: Tensor) -> Tensor:
        return x.reshape(T * B, x.shape[-1])

    d_w_hh0 = weight_grad(flat(d_gates[0]), flat(hs[:T]))
    inner_grads = []
    for k in range(1, D):
        inner_grads += [weight_grad(flat(d_gates[k]), flat(uv[k])), flat(d_gates[k]).sum(0)]
    return [d_gates[0], d_w_hh0, *inner_grads, dh, *dc]


class _NestedLSTMSequence(torch.autograd.Function):
    """A whole sequence through one nested cell, with a hand-written backward.

    forward(xproj, w_hh0, w_1, b_1, ..., w_{D-1}, b_{D-1}, h0, c0_0, ..., c0_{D-1}, tanh_outer)
      xproj  (T, B, 4H): level 0's input projection plus its bias for every step (computed
             outside by autograd: one GEMM, or a lookup for one-hot inputs)
      w_hh0  (4H, H)
      w_k    (4H, 2H): level k's [weight_ih | weight_hh], b_k (4H,)
    returns (hs (T, B, H), h_T, c_0(T), ..., c_{D-1}(T)).

    The work is in `sequence_forward` and `sequence_backward` (plain functions of tensors, so
    that training.nlstm_graphs can capture them in CUDA graphs).
    """

    @staticmethod
    def forward(ctx, xproj, w_hh0, *rest):
        D = len(rest) // 3  # rest: 2(D-1) inner weights, D+1 states, the flag
        tanh_outer = rest[-1]
        outputs, saved = sequence_forward(
            xproj, w_hh0, list(rest[: 2 * (D - 1)]), list(rest[2 * (D - 1) : -1]), tanh_outer
        )
        ctx.tanh_outer = tanh_outer
        ctx.save_for_backward(*saved)
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_hs, d_hT, *d_cT):
        grads = sequence_backward(list(ctx.saved_tensors), d_hs, d_hT, list(d_cT), ctx.tanh_outer)
        return (*grads, None)


def nested_lstm_sequence(
    cell: NestedLSTMCell, x: Tensor, state: State, cuda_graphs: bool = False
) -> tuple[Tensor, State]:
    """Run `cell` over x of shape (T, B, in) (or (T, B) one-hot indices) from `state`.
    Returns (output (T, B, H), final state). `cuda_graphs`: on CUDA, with gradients on, replay
    the sequence as captured CUDA graphs (training.nlstm_graphs); elsewhere it changes nothing."""
    w_ih0, w_hh0, b0 = cell.level_weights(0)
    xproj = input_projection(x, w_ih0, b0)  # (T, B, 4H): one GEMM (or lookup) for all steps
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
            out, *final = _NestedLSTMSequence.apply(xproj, w_hh0, *inner, *state, tanh_outer)
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
