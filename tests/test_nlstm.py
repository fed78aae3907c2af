"""The Nested LSTM against an independent numpy reference of the paper's equations (1)-(15),
known answers that pin the three mistakes other implementations make, and the fused path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nlstm_exactness import fused_and_reference, randomize

from training.nlstm import NestedLSTM, NestedLSTMCell


# ------------------------------------------------------------------ numpy reference (the paper)
def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_nlstm_step(params, x, h, mems, outer_identity=True):
    """One step written straight from the paper, independent of the torch code.

    params[k] = (W_x, W_h, b) of level k in gate order (i, f, g, o); mems[k] is level k's
    memory c_k(t-1). Returns (h_t, [c_0(t), ..., c_{D-1}(t)]).
    """
    D = len(params)

    def memory_function(k, x_tilde, h_tilde, mem_prev):
        """Level k's LSTM with input x~ and hidden h~ (eqs. 10-14); returns (h~_t, memories)."""
        W_x, W_h, b = params[k]
        a = W_x @ x_tilde + W_h @ h_tilde + b
        H = a.shape[0] // 4
        i, f, g, o = (
            sigmoid(a[:H]),
            sigmoid(a[H : 2 * H]),
            np.tanh(a[2 * H : 3 * H]),
            sigmoid(a[3 * H :]),
        )
        if k == D - 1:  # the innermost memory function is addition (eq. 9 / eq. 12)
            c = f * mem_prev[0] + i * g
            inner = [c]
        else:  # eqs. 7, 8, 15: nest again
            c, deeper = memory_function(k + 1, i * g, f * mem_prev[0], mem_prev[1:])
            inner = [c] + deeper
        return o * np.tanh(c), inner

    # level 0: eqs. (1)-(8) with sigma_c = identity (the paper's NLSTM runs)
    W_x, W_h, b = params[0]
    a = W_x @ x + W_h @ h + b
    H = a.shape[0] // 4
    i, f, o = sigmoid(a[:H]), sigmoid(a[H : 2 * H]), sigmoid(a[3 * H :])
    g = a[2 * H : 3 * H] if outer_identity else np.tanh(a[2 * H : 3 * H])
    h_tilde_prev = f * mems[0]  # eq. 7
    x_tilde = i * g  # eq. 8
    if D == 1:
        c0 = h_tilde_prev + x_tilde  # additive memory function: the classic LSTM (eq. 9)
        new_mems = [c0]
    else:
        c0, deeper = memory_function(1, x_tilde, h_tilde_prev, mems[1:])  # eq. 15: c_t = h~_t
        new_mems = [c0] + deeper
    return o * np.tanh(c0), new_mems


def cell_params_np(cell: NestedLSTMCell):
    return [
        tuple(p.detach().double().numpy() for p in cell.level_weights(k)) for k in range(cell.depth)
    ]


# ------------------------------------------------------------------------------ known answers
@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("outer", ["identity", "tanh"])
def test_cell_matches_numpy_reference(depth, outer):
    torch.manual_seed(depth)
    B, n_in, H, T = 3, 5, 4, 6
    cell = NestedLSTMCell(n_in, H, depth=depth, outer_activation=outer).double()
    randomize(cell)
    params = cell_params_np(cell)
    xs = np.random.default_rng(1).normal(size=(T, B, n_in))
    state = cell.initial_state(B, dtype=torch.float64)
    ref_h = [np.zeros(H) for _ in range(B)]
    ref_m = [[np.zeros(H) for _ in range(depth)] for _ in range(B)]
    for t in range(T):
        with torch.no_grad():
            h, state = cell(torch.from_numpy(xs[t]), state)
        for b in range(B):
            ref_h[b], ref_m[b] = np_nlstm_step(
                params, xs[t, b], ref_h[b], ref_m[b], outer == "identity"
            )
            np.testing.assert_allclose(h[b].numpy(), ref_h[b], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(state[0][b].numpy(), ref_h[b], rtol=1e-12, atol=1e-12)
            for k in range(depth):
                np.testing.assert_allclose(
                    state[k + 1][b].numpy(), ref_m[b][k], rtol=1e-12, atol=1e-12
                )


def _scalar_cell(outer_g: float):
    """A 1-cell depth-2 NLSTM with hand-set weights: x = 1, h = 0, so each level-0 gate's
    pre-activation is its input weight; the inner level's gates are set the same way."""
    cell = NestedLSTMCell(1, 1, depth=2).double()
    with torch.no_grad():
        for p in cell.parameters():
            p.zero_()
        cell.weight_ih_l0.copy_(
            torch.tensor([[0.5], [-0.3], [outer_g], [0.8]], dtype=torch.float64)
        )  # i f g o
        cell.bias_l1.copy_(torch.tensor([0.2, 0.1, 0.4, -0.6], dtype=torch.float64))
        cell.weight_ih_l1.copy_(
            torch.tensor([[0.7], [0.0], [0.9], [0.0]], dtype=torch.float64)
        )  # reads u only
        cell.weight_hh_l1.copy_(
            torch.tensor([[0.0], [0.6], [-0.5], [0.3]], dtype=torch.float64)
        )  # reads v only
    return cell


def _scalar_by_hand(outer_g, c0_prev, c1_prev, mistake=None):
    """The step of `_scalar_cell` computed by hand; `mistake` reproduces a known wrong variant."""
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    g0 = math.tanh(outer_g) if mistake == "tanh_outer" else outer_g  # identity at level 0
    i0, f0, o0 = s(0.5), s(-0.3), s(0.8)
    u = i0 + g0 if mistake == "add_inner_input" else i0 * g0  # the inner input is a product
    v = f0 * c0_prev  # the inner hidden is f * c(t-1)
    i1, f1, g1, o1 = (
        s(0.2 + 0.7 * u),
        s(0.1 + 0.6 * v),
        math.tanh(0.4 + 0.9 * u - 0.5 * v),
        s(-0.6 + 0.3 * v),
    )
    c1 = f1 * c1_prev + i1 * g1
    c0 = o1 * math.tanh(c1)  # outer memory = the inner cell's hidden output
    h = o0 * math.tanh(c0)
    if mistake == "carry_tanh":  # memories carried as tanh(c) instead of c
        c0, c1 = math.tanh(c0), math.tanh(c1)
    return h, c0, c1


@pytest.mark.parametrize("mistake", ["tanh_outer", "add_inner_input", "carry_tanh"])
def test_known_answer_pins_each_common_mistake(mistake):
    outer_g, c0_prev, c1_prev = 2.5, 2.0, 3.0
    cell = _scalar_cell(outer_g)
    state = tuple(torch.tensor([[v]], dtype=torch.float64) for v in (0.0, c0_prev, c1_prev))
    with torch.no_grad():
        h, (h2, c0, c1) = cell(torch.ones(1, 1, dtype=torch.float64), state)
    got = (h.item(), c0.item(), c1.item())
    right = _scalar_by_hand(outer_g, c0_prev, c1_prev)
    wrong = _scalar_by_hand(outer_g, c0_prev, c1_prev, mistake)
    assert h2.item() == h.item()
    assert got == pytest.approx(right, abs=1e-14)
    # the mistaken variant differs measurably, so the assertion above tells them apart
    assert max(abs(a - b) for a, b in zip(got, wrong, strict=True)) > 1e-3


def test_outer_activation_option_changes_only_level0_candidate():
    x = torch.ones(1, 1, dtype=torch.float64)
    ident = _scalar_cell(2.5)
    tanh_ = _scalar_cell(2.5)
    tanh_.outer_activation = "tanh"
    h_id, _ = ident(x)
    h_tanh, _ = tanh_(x)
    assert h_id.item() == pytest.approx(_scalar_by_hand(2.5, 0.0, 0.0)[0], abs=1e-14)
    assert h_tanh.item() == pytest.approx(_scalar_by_hand(math.tanh(2.5), 0.0, 0.0)[0], abs=1e-14)
    with pytest.raises(ValueError, match="outer_activation must be one of"):
        NestedLSTMCell(2, 2, outer_activation="relu")


def test_additive_memory_function_is_the_classic_lstm():
    """Depth 1 (the memory function is addition, eq. 9) with a tanh candidate is nn.LSTMCell."""
    torch.manual_seed(0)
    cell = NestedLSTMCell(5, 7, depth=1, outer_activation="tanh").double()
    randomize(cell)
    ref = torch.nn.LSTMCell(5, 7).double()
    with torch.no_grad():
        ref.weight_ih.copy_(cell.weight_ih_l0)
        ref.weight_hh.copy_(cell.weight_hh_l0)
        ref.bias_ih.copy_(cell.bias_l0)
        ref.bias_hh.zero_()
    x = torch.randn(4, 5, dtype=torch.float64)
    state = (torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64))
    h, (_h2, c) = cell(x, state)
    h_ref, c_ref = ref(x, state)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, c_ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- interface and shapes
def test_parameter_names_and_shapes():
    cell = NestedLSTMCell(10, 6, depth=3)
    shapes = {n: tuple(p.shape) for n, p in cell.named_parameters()}
    assert shapes == {
        "weight_ih_l0": (24, 10), "weight_hh_l0": (24, 6), "bias_l0": (24,),
        "weight_ih_l1": (24, 6), "weight_hh_l1": (24, 6), "bias_l1": (24,),
        "weight_ih_l2": (24, 6), "weight_hh_l2": (24, 6), "bias_l2": (24,),
    }  # fmt: skip


def test_state_none_means_zeros_and_shapes():
    cell = NestedLSTMCell(3, 4, depth=3)
    x = torch.randn(2, 3)
    h, state = cell(x)
    h0, _state0 = cell(x, tuple(torch.zeros(2, 4) for _ in range(4)))
    assert len(state) == 4 and all(t.shape == (2, 4) for t in state)
    torch.testing.assert_close(h, h0)
    with pytest.raises(ValueError, match="4 tensors"):
        cell(x, (torch.zeros(2, 4),) * 3)
    with pytest.raises(ValueError, match=r"\(B, hidden_size\)"):
        cell(x, (torch.zeros(2, 5),) * 4)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        NestedLSTMCell(3, 4, depth=0)


def test_initialisation_follows_the_paper():
    torch.manual_seed(0)
    layer = NestedLSTM(50, 64, depth=2, num_layers=2)
    first, second = layer.layers
    # Glorot uniform bound for the first layer's input weights only
    bound = math.sqrt(6 / (50 + 4 * 64))
    assert first.weight_ih_l0.abs().max() <= bound
    # uniform on [-bound, bound]: variance bound^2 / 3 (zeros would pass the bound alone)
    assert first.weight_ih_l0.var().item() == pytest.approx(bound**2 / 3, rel=0.05)
    # every other weight: each gate block orthogonal
    for w in (first.weight_hh_l0, first.weight_ih_l1, first.weight_hh_l1, second.weight_ih_l0):
        for block in w.detach().chunk(4, dim=0):
            torch.testing.assert_close(block @ block.t(), torch.eye(64), atol=1e-5, rtol=0)
    assert all((getattr(first, f"bias_l{k}") == 0).all() for k in range(2))


def test_baseline_lstm_and_head_initialisation_follow_the_paper():
    from training.baselines import LSTM
    from training.models import ModelConfig, build_model

    torch.manual_seed(0)
    lstm = LSTM(50, 64, num_layers=2)
    bound = math.sqrt(6 / (50 + 4 * 64))
    w = lstm.weight_ih_l0.detach()
    assert w.abs().max() <= bound and w.var().item() == pytest.approx(bound**2 / 3, rel=0.05)
    for w in (lstm.weight_hh_l0, lstm.weight_ih_l1, lstm.weight_hh_l1):
        for block in w.detach().chunk(4, dim=0):
            torch.testing.assert_close(block @ block.t(), torch.eye(64), atol=1e-5, rtol=0)
    assert all((getattr(lstm, f"bias_l{n}") == 0).all() for n in range(2))
    # the softmax layer ("the final output gate") is orthogonal too: (V, H) with V < H here
    model = build_model(
        ModelConfig(kind="char", core="lstm", hidden_size=64, num_layers=1, vocab_size=20)
    )
    head = model.head.weight.detach()
    torch.testing.assert_close(head @ head.t(), torch.eye(20), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("outer", ["identity", "tanh"])
def test_fused_sequence_equals_step_by_step(depth, outer):
    T = 9
    case = fused_and_reference(depth, outer, n_in=5, H=4, T=T, seed=depth, std=0.4)
    case.assert_exact()
    layer, x, state = case.layer, case.x, case.state
    out_f = case.fused[0]

    # and the layer equals its cells stepped by hand, one time step at a time
    with torch.no_grad():
        inp, finals = x, []
        for cell, s in zip(layer.layers, state, strict=True):
            outs = []
            for t in range(T):
                h, s = cell(inp[t], s)
                outs.append(h)
            inp = torch.stack(outs)
            finals.append(s)
        torch.testing.assert_close(inp, out_f[0], rtol=1e-12, atol=1e-12)


def test_fused_path_gradcheck():
    torch.manual_seed(0)
    layer = NestedLSTM(3, 2, depth=3).double()
    randomize(layer, std=0.8)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    state = (tuple(torch.randn(2, 2, dtype=torch.float64, requires_grad=True) for _ in range(4)),)

    def f(x, *flat_state):
        out, final = layer(x, (flat_state,))
        return (out, *final[0])

    assert torch.autograd.gradcheck(f, (x, *state[0]))


@pytest.mark.parametrize("V", [11, 40])  # fewer / more classes than the 24 positions
def test_one_hot_indices_equal_dense_one_hot(V):
    """Outputs and every parameter's gradient: indices (the fused sequence looks up W^T + b
    when T*B >= V, else W^T then adds b) against the reference cell on dense one-hot vectors."""
    torch.manual_seed(0)
    T, B = 6, 4
    layer = NestedLSTM(V, 8, depth=2).double()
    randomize(layer, std=0.5)
    tokens = torch.randint(0, V, (T, B))
    dense = torch.nn.functional.one_hot(tokens, V).double()

    def run(x, fused):
        layer.fused = fused
        out, _ = layer(x)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
        return [out, *torch.autograd.grad(loss, list(layer.parameters()))]

    reference = run(dense, False)
    for got in (run(tokens, True), run(tokens, False), run(dense, True)):
        for a, b in zip(got, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="integer one-hot indices"):
        layer(torch.randn(T, B))


def test_gradients_reach_every_level_and_layer():
    torch.manual_seed(0)
    layer = NestedLSTM(6, 5, depth=3, num_layers=2)
    out, _ = layer(torch.randn(7, 2, 6))
    out.pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_float32_fused_matches_reference_closely():
    torch.manual_seed(0)
    layer = NestedLSTM(50, 64, depth=2)
    tokens = torch.randint(0, 50, (30, 8))
    layer.fused = True
    a, sa = layer(tokens)
    layer.fused = False
    b, sb = layer(tokens)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for u, v in zip(sa[0], sb[0], strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_fused_matches_cpu():
    torch.manual_seed(0)
    layer = NestedLSTM(20, 32, depth=2, num_layers=2).double()
    x = torch.randint(0, 20, (15, 4))
    out_cpu, _ = layer(x)
    out_gpu, _ = layer.cuda()(x.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-9, atol=1e-9)


def test_fused_path_runs_under_bf16_autocast():
    torch.manual_seed(0)
    layer = NestedLSTM(10, 16, depth=2, num_layers=2)
    head = torch.nn.Linear(16, 10)
    x = torch.randn(5, 3, 10)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out, _state = layer(x)  # the bf16 input projection feeds a float32 recurrence
        logits = head(out)
    assert out.dtype == torch.float32 and logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert layer.layers[1].weight_hh_l1.grad is not None
    ref, _ = layer(x)
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)  # bf16 input projection
    assert not torch.equal(out, ref)


@pytest.mark.parametrize("B,T", [(1, 1), (1, 4), (2, 1)])
def test_gradients_with_batch_or_time_of_one(B, T):
    """Autograd may hand one gradient buffer to several outputs (and (1, H) transposes are
    views): the backward must never update an incoming gradient in place."""
    torch.manual_seed(0)
    layer = NestedLSTM(4, 3, depth=3).double()
    randomize(layer)
    x = torch.randn(T, B, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, 3, dtype=torch.float64)

    def grads(fused):
        layer.fused = fused
        out, ((h, c0, c1, c2),) = layer(x)
        loss = out.sum() + ((h + c0 + c1 + c2) * w).sum()
        return torch.autograd.grad(loss, [x, *layer.parameters()])

    for a, b in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_gradcheck_over_parameters():
    torch.manual_seed(0)
    layer = NestedLSTM(3, 2, depth=2).double()
    randomize(layer, std=0.8)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(3, 2, 3, dtype=torch.float64)

    def f(*params):
        out, _ = torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (x,))
        return out

    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    assert torch.autograd.gradcheck(f, params)


def test_empty_sequence_and_bad_inputs():
    layer = NestedLSTM(4, 3, depth=2).double()
    out, _state = layer(torch.zeros(0, 2, 4, dtype=torch.float64))
    assert out.shape == (0, 2, 3) and out.dtype == torch.float64
    with pytest.raises(ValueError, match=r"shape \(T, B, 4\)"):
        layer(torch.zeros(5, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        layer(torch.tensor([[4]]))
    with pytest.raises(ValueError, match="like the weights"):
        layer(
            torch.zeros(5, 2, 4, dtype=torch.float64), (tuple(torch.zeros(2, 3) for _ in range(3)),)
        )
    with pytest.raises(ValueError, match=r"shape \(B, 4\)"):
        layer.layers[0](torch.zeros(2, 5, dtype=torch.float64))


# ------------------------------------------------------------- the fused path's matrix products
def test_step_linear_and_weight_grad_match_float64_on_both_kernels(monkeypatch):
    """training.gemm's two kernels (oneDNN for float32 on the CPU, torch.mm otherwise) compute
    x W^T (+ bias) (+ add) and d^T x: each against float64, with every combination used."""
    from training import gemm

    g = torch.Generator().manual_seed(0)
    B, K, N = 5, 7, 12
    w, x = torch.randn(N, K, generator=g), torch.randn(B, K, generator=g)
    bias, add = torch.randn(N, generator=g), torch.randn(B, N, generator=g)
    d, xs = torch.randn(40, N, generator=g), torch.randn(40, K, generator=g)
    ref = x.double() @ w.double().t()
    monkeypatch.setattr(gemm, "MIN_ONEDNN_ELEMENTS", 0)  # these sizes would stay on torch.mm
    for onednn in (True, False):
        monkeypatch.setattr(gemm, "ONEDNN", onednn)
        assert gemm.uses_onednn(w) == (onednn and gemm.onednn_available())
        lin = gemm.StepLinear(w, B)
        out = torch.empty(B, N)
        for got, want in [
            (lin(x), ref),
            (lin(x, add=add), ref + add.double()),
            (lin(x, out=out), ref),
            (gemm.StepLinear(w, B, bias)(x), ref + bias.double()),
            (gemm.StepLinear(w, B, bias)(x, add=add), ref + bias.double() + add.double()),
            (gemm.StepLinear(w.t(), B)(add), add.double() @ w.double()),  # the backward's W^T
            (gemm.weight_grad(d, xs), d.double().t() @ xs.double()),  # out > in: d_out first
            (gemm.weight_grad(xs, d), xs.double().t() @ d.double()),  # in > out
        ]:
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        assert out.abs().sum() > 0  # out= was written


def test_onednn_is_used_for_float32_on_this_cpu():
    from training import gemm

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    assert gemm.onednn_available()
    big = torch.zeros(4 * 600, 600)  # the paper's PTB model: oneDNN; a 32-cell model: torch.mm
    assert gemm.uses_onednn(big) and not gemm.uses_onednn(big.double())
    assert not gemm.uses_onednn(torch.zeros(4 * 32, 32))
    assert (
        gemm.StepLinear(big, 32).onednn and not gemm.StepLinear(torch.zeros(4 * 32, 32), 32).onednn
    )


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_fused_float32_kernels_agree(depth, monkeypatch):
    """The float32 fused path through oneDNN and through torch.mm: the same outputs, final
    state and gradients up to float32 rounding (the float64 tests above pin the math)."""
    from training import gemm

    torch.manual_seed(0)
    layer = NestedLSTM(11, 16, depth=depth, num_layers=2)
    randomize(layer, std=0.3)
    tokens = torch.randint(0, 11, (13, 6))
    h0 = tuple(tuple(torch.randn(6, 16) for _ in range(depth + 1)) for _ in range(2))

    monkeypatch.setattr(gemm, "MIN_ONEDNN_ELEMENTS", 0)  # 16 cells would stay on torch.mm

    def run(onednn):
        monkeypatch.setattr(gemm, "ONEDNN", onednn)
        out, final = layer(tokens, h0)
        flat = [out] + [t for s in final for t in s]
        loss = sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in flat)
        return flat, torch.autograd.grad(loss, list(layer.parameters()))

    (out_a, grad_a), (out_b, grad_b) = run(True), run(False)
    for a, b in zip(out_a + list(grad_a), out_b + list(grad_b), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(gemm, "ONEDNN", True)
    layer.fused = False  # and both equal the reference cell stepped by autograd
    ref, _ = layer(tokens, h0)
    torch.testing.assert_close(out_a[0], ref, rtol=1e-4, atol=1e-5)


def test_in_place_changes_to_the_output_leave_the_gradients_right():
    """The fused forward copies its outputs out of the buffers the backward reads: a caller
    that changes them in place still gets the reference path's gradients."""
    torch.manual_seed(0)
    layer = NestedLSTM(4, 3, depth=2).double()
    x = torch.randn(5, 2, 4, dtype=torch.float64)

    def grads(fused):
        layer.fused = fused
        out, ((h, _c0, c1),) = layer(x)
        out.mul_(2.0)
        h.add_(1.0)
        return torch.autograd.grad(
            (out**2).sum() + (h**2).sum() + c1.sum(), list(layer.parameters())
        )

    for a, b in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
