"""HM-LSTM: one step of each operation by hand, the straight-through estimator, the slope
schedule, COPY skipping, the output module and the model registry."""

from __future__ import annotations

import pytest
import torch

from training.hmlstm import (
    HMLSTM,
    HMOutputModule,
    binarize_straight_through,
    hard_sigmoid,
    slope_schedule,
)
from training.models import ModelConfig, build_model, pack_state, state_slots, unpack_state

H = 3


def _model(seed=0, z_bias=None):
    torch.manual_seed(seed)
    m = HMLSTM(4, H, num_layers=2).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        if z_bias is not None:  # force layer 0's boundary: hard sigmoid saturates at 0 or 1
            m.bias_l0[4 * H] = z_bias
    return m


def _state(z0: float, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(2, H, generator=g, dtype=torch.float64)  # noqa: E731
    return ((r(), r(), torch.full((2, H), z0, dtype=torch.float64)), (r(), r()))


def _gates(m, n, h_prev, h_td, z_prev, bottom, z_below):
    # eq. (4): recurrent + top-down + bottom-up + bias, summed in that order
    s = h_prev @ getattr(m, f"weight_hh_l{n}").t()
    if h_td is not None:
        s = s + z_prev * (h_td @ getattr(m, f"weight_td_l{n}").t())
    s = s + z_below * (bottom @ getattr(m, f"weight_ih_l{n}").t()) + getattr(m, f"bias_l{n}")
    sg = torch.sigmoid
    return (
        sg(s[:, :H]),
        sg(s[:, H : 2 * H]),
        torch.tanh(s[:, 2 * H : 3 * H]),
        sg(s[:, 3 * H : 4 * H]),
        s,
    )


@torch.no_grad()
def test_update_is_the_lstm_update():
    m = _model(z_bias=100.0)  # layer 0 fires a boundary, so layer 1 UPDATEs
    x = torch.randn(2, 4, dtype=torch.float64)
    state = _state(z0=0.0)  # layer 0: z_{t-1} = 0 and z^0 = 1: UPDATE
    _, new, z = m.step(x, state)
    (h0, c0, _), (h1, c1) = state
    i, f, g, o, _ = _gates(m, 0, h0, h1, 0.0, x, 1.0)
    torch.testing.assert_close(new[0][1], f * c0 + i * g, rtol=0, atol=1e-15)
    torch.testing.assert_close(new[0][0], o * torch.tanh(f * c0 + i * g), rtol=0, atol=1e-15)
    assert (z == 1).all() and (new[0][2] == 1).all()
    i, f, g, o, _ = _gates(m, 1, h1, None, 0.0, new[0][0], 1.0)  # the last layer: no top-down
    torch.testing.assert_close(new[1][1], f * c1 + i * g, rtol=0, atol=1e-15)


@torch.no_grad()
def test_flush_discards_the_previous_cell():
    m = _model(z_bias=-100.0)
    x = torch.randn(2, 4, dtype=torch.float64)
    state = _state(z0=1.0)  # layer 0 had a boundary: FLUSH (with the top-down term on)
    _, new, _ = m.step(x, state)
    (h0, _c0, _), (h1, _) = state
    i, _f, g, o, _ = _gates(m, 0, h0, h1, 1.0, x, 1.0)
    assert torch.equal(new[0][1], i * g)  # c = i * g: nothing of c_{t-1}
    torch.testing.assert_close(new[0][0], o * torch.tanh(i * g), rtol=0, atol=1e-15)


@torch.no_grad()
@pytest.mark.parametrize("skip", [True, False])
def test_copy_leaves_h_and_c_bit_identical(skip):
    m = _model(z_bias=-100.0).eval()  # layer 0 emits no boundary, so layer 1 COPYs
    m.skip_copy = skip
    x = torch.randn(2, 4, dtype=torch.float64)
    state = _state(z0=0.0)
    _, new, z = m.step(x, state)
    assert (z == 0).all()
    assert torch.equal(new[1][0], state[1][0]) and torch.equal(new[1][1], state[1][1])


def test_straight_through_gradient_is_the_hard_sigmoid_slope():
    a = 2.0
    x = torch.tensor([-1.0, -0.2, 0.1, 0.3, 2.0], requires_grad=True)
    z = binarize_straight_through(hard_sigmoid(x, a))
    assert z.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]  # a step function forward
    z.sum().backward()
    # d/dx clamp((a x + 1) / 2, 0, 1) = a / 2 inside (-1/a, 1/a), 0 outside
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert hard_sigmoid(torch.tensor([-0.5, 0.0, 0.5]), 2.0).tolist() == [0.0, 0.5, 1.0]


def test_slope_schedule_and_trainer_hook():
    assert slope_schedule(0) == 1.0
    assert slope_schedule(25) == pytest.approx(2.0)
    assert slope_schedule(100) == 5.0 and slope_schedule(300) == 5.0
    model = build_model(
        ModelConfig(kind="char", core="hmlstm", hidden_size=4, num_layers=3, vocab_size=5)
    )
    model.set_epoch(50)
    assert model.core.slope == pytest.approx(3.0)


def test_trainer_anneals_the_slope_each_epoch(tmp_path, monkeypatch):
    """train() sets a = min(5, 1 + 0.04 * epoch) at each epoch start: 1.0, 1.04, 1.08 over the
    optimizer steps of three epochs."""
    from training import trainer
    from training.config import TrainConfig
    from training.testing.data import stream_prepared

    built = []  # the model the trainer builds, kept so that on_step can read its slope

    def keep(cfg):
        built.append(build_model(cfg))
        return built[-1]

    monkeypatch.setattr(trainer, "build_model", keep)
    slopes = []
    config = TrainConfig(
        task="ptb",
        model={"core": "hmlstm", "hidden_size": 4, "num_layers": 2},
        batch_size=4,
        seq_len=20,
        epochs=3,
        checkpoint_every=0,
        seed=0,
    )
    prepared = stream_prepared(tmp_path / "data", n_train=400, n_eval=100)
    trainer.train(
        config,
        tmp_path / "run",
        prepared=prepared,
        log=lambda *_: None,
        progress=False,
        on_step=lambda step: slopes.append(built[0].core.slope),
    )
    assert len(built) == 1
    per_epoch = len(slopes) // 3
    assert per_epoch >= 2 and len(slopes) == 3 * per_epoch
    assert slopes == pytest.approx([1.0] * per_epoch + [1.04] * per_epoch + [1.08] * per_epoch)


@torch.no_grad()
def test_skipping_whole_batch_copies_changes_nothing_and_counts_ops():
    m = _model(z_bias=-100.0).eval()
    x = torch.randn(7, 2, 4, dtype=torch.float64)
    m.skip_copy = True
    out_skip, st_skip, z_skip, counts = m(x, return_boundaries=True)
    m.skip_copy = False
    out_all, st_all, z_all, counts_all = m(x, return_boundaries=True)
    assert torch.equal(out_skip, out_all) and torch.equal(z_skip, z_all)
    for a, b in zip(st_skip, st_all, strict=True):
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v)
    assert counts == counts_all
    assert counts[0] == {"update": 14, "copy": 0, "flush": 0}  # the first layer never copies
    assert counts[1] == {"update": 0, "copy": 14, "flush": 0}


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(kind="char", core="hmlstm", hidden_size=6, num_layers=3, vocab_size=9)
    )
    with torch.no_grad():  # boundaries that fire sometimes, so every path is exercised
        for n in range(2):
            getattr(model.core, f"bias_l{n}")[4 * 6] = 0.05
    logits, _ = model(torch.randint(0, 9, (12, 4)))
    logits.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@torch.no_grad()
def test_layer_norm_comes_before_the_gates_so_a_gate_of_zero_removes_its_term():
    """Eq. (6) with layer normalisation: z * LN(W h), not LN(z * W h), whose LN(0) would be the
    norm's bias: a gated-off term would still add a learned constant."""
    torch.manual_seed(0)
    m = HMLSTM(4, H, num_layers=3, layer_norm=True).double()
    for p in m.parameters():
        p.copy_(torch.randn_like(p))
    x = torch.randn(2, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    r = lambda: torch.randn(2, H, generator=g, dtype=torch.float64)  # noqa: E731
    zeros = torch.zeros(2, H, dtype=torch.float64)
    # layer 0 had no boundary at t-1 (z_{t-1}^0 = 0): its top-down term is gated off; UPDATE
    state = ((r(), r(), zeros), (r(), r(), zeros), (r(), r()))
    ln = m.norms[0]
    # reference, by hand: recurrent and bottom-up normalised, top-down gated off entirely
    s = ln[0](state[0][0] @ m.weight_hh_l0.t()) + ln[2](x @ m.weight_ih_l0.t()) + m.bias_l0
    i, f, gg, o = (
        torch.sigmoid(s[:, :H]),
        torch.sigmoid(s[:, H : 2 * H]),
        torch.tanh(s[:, 2 * H : 3 * H]),
        torch.sigmoid(s[:, 3 * H : 4 * H]),
    )
    _, new, _ = m.step(x, state)
    torch.testing.assert_close(new[0][1], f * state[0][1] + i * gg, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        new[0][0], o * torch.tanh(f * state[0][1] + i * gg), rtol=0, atol=1e-12
    )
    # and so the layer above's h cannot reach layer 0 while the gate is 0, whatever the norm's bias
    other = (state[0], (r() * 10, state[1][1], zeros), state[2])
    ln[1].bias.add_(3.0)
    _, new2, _ = m.step(x, other)
    torch.testing.assert_close(new2[0][0], new[0][0], rtol=0, atol=0)


def test_layer_norm_option_and_registry():
    cfg = ModelConfig(
        kind="char",
        core="hmlstm",
        hidden_size=5,
        num_layers=3,
        vocab_size=7,
        embedding_size=11,
        layer_norm=True,
    )
    model = build_model(cfg)
    assert isinstance(model.head, HMOutputModule) and model.head.embed.out_features == 11
    assert state_slots(cfg) == [
        "layer0.h",
        "layer0.c",
        "layer0.z",
        "layer1.h",
        "layer1.c",
        "layer1.z",
        "layer2.h",
        "layer2.c",
    ]
    tokens = torch.randint(0, 7, (6, 2))
    logits, state = model(tokens)
    assert logits.shape == (6, 2, 7)
    packed = pack_state(state)
    assert packed.shape == (2, 8, 5)
    logits2, _ = model(tokens[3:], unpack_state(pack_state(model(tokens[:3])[1]), cfg))
    torch.testing.assert_close(logits2, logits[3:])
    with pytest.raises(ValueError, match="num_layers >= 2"):
        HMLSTM(3, 4, num_layers=1)


def test_output_module_gates_each_layer():
    torch.manual_seed(0)
    mod = HMOutputModule(hidden_size=2, num_layers=2, embedding_size=3, out_features=4)
    with torch.no_grad():
        mod.gates.weight.zero_()  # g^l = sigmoid(0) = 1/2 for each layer
    hs = torch.randn(5, 4)
    want = mod.out(torch.relu(mod.embed(hs * 0.5)))
    torch.testing.assert_close(mod(hs), want)
