"""The Nested LSTM's fast path: a whole sequence through one nested cell as one autograd
Function with a hand-written backward (training.nlstm's `nested_lstm_sequence` calls it; the
equations, the notation and the reference cell are training/nlstm.py's).

A Python loop of cells leaves autograd to record ~20 small ops per step and to multiply every
weight gradient one time step at a time. `NestedLSTMSequence` instead saves the gate
activations, runs the recurrence into preallocated buffers, and in the backward pass computes
each weight gradient as ONE GEMM over all T*B positions (as cuDNN does for LSTMs); only the data
gradients (B x 4H times 4H x 2H) stay inside the time loop. On the CPU each step's pointwise work
between those products (activations, memory updates, derivatives) runs as one C++ kernel per
level when training.nlstm_native could build them, else as separate torch ops (the same math,
written out below). `sequence_forward` and `sequence_backward` are plain functions of tensors,
so that training.nlstm_graphs can capture them in CUDA graphs.

Imports only torch (and training.gemm and training.nlstm_native, which import only torch).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from training import nlstm_native
from training.gemm import StepLinear, weight_grad


def sequence_forward(
    xproj: Tensor, w_hh0: Tensor, inner: list[Tensor], state0: list[Tensor], tanh_outer: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """The recurrence of `NestedLSTMSequence` (see there for the arguments), into fresh buffers.

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
            # k = 0: (B, 4H) = xproj[t] + h_{t-1} W_hh0^T; k > 0: [u, v] W_k^T + b_k. The C++
            # kernel adds xproj[t] as it activates (the same float32 sum, one pass fewer than
            # the product's post-op); the torch ops have the product add it.
            if k == 0:
                G = lin[0](hs[t]) if cpp is not None else lin[0](hs[t], add=xproj[t])
            else:
                G = lin[k](uv[k][t])
            gates[k].append(G)
            if cpp is not None:  # the same math as the ops below, one pass per level
                add = xproj[t] if k == 0 else None
                if k + 1 < D:
                    cpp.down(G, mems[k][t], uv[k + 1][t], tanh_g[k], add)
                else:
                    tm = [x[t] for x in tanh_mems]
                    g_t = [level[t] for level in gates]
                    cpp.up(g_t, mems[k][t], tanh_g[k], [m[t + 1] for m in mems], tm, hs[t + 1], add)
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


class NestedLSTMSequence(torch.autograd.Function):
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
