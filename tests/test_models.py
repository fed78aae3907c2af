"""Baselines, task models, the state layout, the paper's parameter counts and `nlstm params`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from training.baselines import LSTM
from training.cli import main
from training.models import (
    ModelConfig,
    build_model,
    count_parameters,
    pack_state,
    state_slots,
    unpack_state,
)
from training.paper import HMLSTM_ROWS, TABLES, paper_rows, round_like


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("layers", [1, 3])
def test_lstm_fused_equals_reference_and_nn_lstm(layers):
    torch.manual_seed(0)
    T, B, n_in, H = 8, 3, 6, 5
    lstm = LSTM(n_in, H, num_layers=layers).double()
    _randomize(lstm)
    ref = torch.nn.LSTM(n_in, H, num_layers=layers).double()
    with torch.no_grad():
        for n in range(layers):
            w_ih, w_hh, b = lstm.layer_weights(n)
            getattr(ref, f"weight_ih_l{n}").copy_(w_ih)
            getattr(ref, f"weight_hh_l{n}").copy_(w_hh)
            getattr(ref, f"bias_ih_l{n}").copy_(b)
            getattr(ref, f"bias_hh_l{n}").zero_()
    x = torch.randn(T, B, n_in, dtype=torch.float64, requires_grad=True)
    state = tuple(
        (torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64))
        for _ in range(layers)
    )

    def run(fused):
        lstm.fused = fused
        out, final = lstm(x, state)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
        loss = loss + sum((h * 0.3 + c * 0.7).sum() for h, c in final)
        return out, final, torch.autograd.grad(loss, [x, *lstm.parameters()])

    out_f, fin_f, g_f = run(True)
    out_r, _fin_r, g_r = run(False)
    torch.testing.assert_close(out_f, out_r, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_f, g_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    h0 = torch.stack([s[0] for s in state])
    c0 = torch.stack([s[1] for s in state])
    out_ref, (_h_ref, c_ref) = ref(x, (h0, c0))
    torch.testing.assert_close(out_f, out_ref, rtol=1e-12, atol=1e-12)
    for n in range(layers):
        torch.testing.assert_close(fin_f[n][1], c_ref[n], rtol=1e-12, atol=1e-12)


def test_lstm_has_one_bias_per_gate():
    lstm = LSTM(50, 600, num_layers=2)
    assert count_parameters(lstm) == 4 * 600 * (50 + 600) + 2400 + 4 * 600 * 1200 + 2400
    assert sorted(n for n, _ in lstm.named_parameters() if "bias" in n) == ["bias_l0", "bias_l1"]
    assert "_zero_bias" not in lstm.state_dict()


def test_lstm_token_inputs_equal_one_hot():
    torch.manual_seed(0)
    lstm = LSTM(9, 4, num_layers=2).double()
    tokens = torch.randint(0, 9, (5, 3))
    for fused in (True, False):
        lstm.fused = fused
        a, _ = lstm(tokens)
        b, _ = lstm(torch.nn.functional.one_hot(tokens, 9).double())
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(kind="char", core="nlstm", hidden_size=8, depth=3, num_layers=2, vocab_size=13),
        ModelConfig(kind="char", core="lstm", hidden_size=8, num_layers=2, vocab_size=13),
        ModelConfig(kind="glimpse", core="nlstm", hidden_size=8, depth=2),
        ModelConfig(kind="glimpse", core="lstm", hidden_size=8, num_layers=3),
    ],
    ids=["char-nlstm", "char-lstm", "glimpse-nlstm", "glimpse-lstm"],
)
def test_task_models_share_one_interface(config):
    torch.manual_seed(0)
    model = build_model(config)
    T, B = 7, 4
    x = torch.randint(0, 13, (T, B)) if config.kind == "char" else torch.rand(T, B, 49)
    logits, state = model(x)
    assert logits.shape == (T, B, config.out_features)
    slots = state_slots(config)
    packed = pack_state(state)
    assert packed.shape == (B, len(slots), config.hidden_size)
    assert slots[0] == "layer0.h"
    # the packed state round-trips and continuing from it equals one long run
    again = unpack_state(packed, config)
    logits2, _ = model(x[:3])
    logits3, _ = model(x[3:], unpack_state(pack_state(model(x[:3])[1]), config))
    torch.testing.assert_close(torch.cat([logits2, logits3]), logits, rtol=1e-5, atol=1e-6)
    for a, b in zip(again, state, strict=True):
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v)
    with pytest.raises(ValueError, match="packed state must be"):
        unpack_state(packed[:, :-1], config)


def test_state_slot_names():
    nl = ModelConfig(kind="char", core="nlstm", hidden_size=4, depth=2, num_layers=2, vocab_size=5)
    assert state_slots(nl) == [
        "layer0.h",
        "layer0.c0",
        "layer0.c1",
        "layer1.h",
        "layer1.c0",
        "layer1.c1",
    ]
    ls = ModelConfig(kind="glimpse", core="lstm", hidden_size=4, num_layers=2)
    assert state_slots(ls) == ["layer0.h", "layer0.c", "layer1.h", "layer1.c"]


def test_config_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match="core must be one of"):
        ModelConfig(core="gru", vocab_size=5)
    with pytest.raises(ValueError, match="vocab_size >= 1"):
        ModelConfig(kind="char", vocab_size=0)
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"kind": "glimpse", "cells": 3})
    model = build_model(ModelConfig(kind="glimpse", hidden_size=4))
    with pytest.raises(ValueError, match=r"glimpses must be \(T, B, 49\)"):
        model(torch.rand(3, 2, 48))


@pytest.mark.parametrize("core", ["nlstm", "lstm"])
@pytest.mark.parametrize("option", [{"embedding_size": 8}, {"layer_norm": True}])
def test_hmlstm_options_on_other_cores_are_refused(core, option):
    """embedding_size and layer_norm configure only the HM-LSTM: elsewhere they would be ignored."""
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"{name} is an hmlstm option.*core '{core}' takes none"):
        ModelConfig(kind="char", core=core, hidden_size=4, vocab_size=5, **option)
    ModelConfig(
        kind="char", core=core, hidden_size=4, vocab_size=5, embedding_size=0, layer_norm=False
    )  # the defaults are fine


def test_hmlstm_config_needs_two_layers():
    with pytest.raises(ValueError, match="hmlstm model needs num_layers >= 2"):
        ModelConfig(kind="char", core="hmlstm", hidden_size=4, vocab_size=5)  # num_layers=1
    with pytest.raises(ValueError, match="embedding_size must be >= 0"):
        ModelConfig(
            kind="char", core="hmlstm", hidden_size=4, num_layers=2, vocab_size=5, embedding_size=-1
        )
    ModelConfig(
        kind="char",
        core="hmlstm",
        hidden_size=4,
        num_layers=2,
        vocab_size=5,
        embedding_size=3,
        layer_norm=True,
    )


# ---------------------------------------------------------------------- the paper's Params
def test_every_table_row_rounds_to_the_papers_params_but_one():
    rows = [r for r in paper_rows() if r.model != "HM-LSTM"]
    assert len(rows) == len(TABLES) == 20
    mismatched = [(r.task, r.model, r.n, r.cell_size) for r in rows if not r.matches]
    assert mismatched == [("mnist", "LSTM", 3, 75)]
    by_key = {(r.task, r.model, r.n, r.cell_size): r.params for r in rows}
    # counts worked out by hand from 4H(in + H) + 4H per level/layer plus the softmax head
    assert (
        by_key[("ptb", "NLSTM", 2, 600)] == 2400 * 650 + 2400 + 2400 * 1200 + 2400 + 600 * 50 + 50
    )
    assert by_key[("ptb", "NLSTM", 2, 600)] == by_key[("ptb", "LSTM", 2, 600)] == 4_474_850
    assert by_key[("mnist", "LSTM", 1, 100)] == 61_010
    assert by_key[("poems", "NLSTM", 2, 32)] == 876_631
    assert by_key[("mnist", "LSTM", 3, 75)] == 128_860


def test_hmlstm_row_counts_the_ptb_model_and_has_no_paper_figure():
    (row,) = [r for r in paper_rows() if r.model == "HM-LSTM"]
    assert HMLSTM_ROWS == [("ptb", "HM-LSTM", 3, 500, None)]
    assert (row.task, row.n, row.cell_size) == ("ptb", 3, 500)
    assert row.paper_params is None and row.matches is None
    # by hand: rows 4H + 1 (boundary) on layers 0-1, 4H on the last; W_ih, U, W_td (not on the
    # last), bias; a LayerNorm (weight + bias) per term; then eq. (11)-(12)'s output module
    H, V, E, R = 500, 50, 500, 4 * 500 + 1
    core = R * (V + H + H + 1) + R * (3 * H + 1) + (R - 1) * (2 * H + 1)
    core += 2 * (3 * R + 3 * R + 2 * (R - 1))  # LayerNorms: 3, 3 and 2 terms
    head = 3 * H * 3 + 3 * H * E + E * V + V
    assert row.params == core + head == 7_920_114


def test_round_like():
    assert round_like(4_474_850, "4.47M") == "4.47M"
    assert round_like(868_311, "868k") == "868k"
    assert round_like(1_085_327, "1.1M") == "1.1M"
    assert round_like(61_010, "61.0k") == "61.0k"


def test_params_command(capsys):
    assert main(["params", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 21
    assert {"task", "model", "n", "cell_size", "params", "paper_params"} <= set(rows[0])
    assert rows[-1]["model"] == "HM-LSTM" and rows[-1]["paper_params"] is None
    assert main(["params", "--poems-vocab", "6000"]) == 0
    table = capsys.readouterr().out
    assert "NLSTM" in table and "4,474,850" in table
    (hm,) = [line for line in table.splitlines() if "HM-LSTM" in line]
    assert hm.split()[:6] == ["ptb", "HM-LSTM", "3", "500", "7,920,114", "-"]
    assert f"{161 * 6000 + 4224:,}" in table  # the 1x32 poems LSTM with a 6,000-symbol vocabulary


def test_cli_module_imports_no_torch():
    """`nlstm serve` and the clients must run without torch: the command module stays light."""
    code = "import sys, training.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# the model code of DESIGN.md's first invariant: the cells, the stacks, the task heads
MODEL_MODULES = (
    "nlstm",
    "nlstm_fused",
    "nlstm_graphs",
    "gemm",
    "levels",
    "baselines",
    "hmlstm",
    "models",
    "model_config",
)
# what model code may import besides torch and itself: the language, nothing that touches files,
# flags, logging setup or protobuf (training.nlstm_native, the C++ kernels' loader, is the one
# module of the package that builds into a cache folder; the model code only calls it)
MODEL_STDLIB = {"__future__", "typing", "dataclasses", "math", "collections", "itertools"}


@pytest.mark.parametrize("name", MODEL_MODULES)
def test_model_code_imports_only_torch(name):
    import ast
    from pathlib import Path

    import training

    source = Path(training.__file__).parent / f"{name}.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            imported |= {
                f"{base}.{alias.name}" if base == "training" else base for alias in node.names
            }
    allowed_training = {f"training.{m}" for m in (*MODEL_MODULES, "nlstm_native")}
    wrong = {
        m
        for m in imported
        if m.split(".")[0] not in {"torch", *MODEL_STDLIB}
        and (m not in allowed_training and not any(m.startswith(a + ".") for a in allowed_training))
    }
    assert not wrong, f"training/{name}.py imports {sorted(wrong)}: model code imports only torch"
