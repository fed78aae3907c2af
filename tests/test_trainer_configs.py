"""configs/: one file per row of the paper's Tables 1-4 with the paper's hyperparameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import load_config, model_config_for
from training.paper import (
    HMLSTM_ROWS,
    PAPER_POEMS_VOCAB,
    PTB_VOCAB,
    TABLES,
    TEXT8_VOCAB,
    model_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KIND = {"ptb": "stream", "text8": "stream", "poems": "sequences", "mnist": "glimpses"}
VOCAB = {"ptb": PTB_VOCAB, "text8": TEXT8_VOCAB, "poems": PAPER_POEMS_VOCAB, "mnist": 0}

# Section 4 of the paper (poems and the MNIST batch size: see the files' comments).
HYPER = {
    "ptb": dict(
        epochs=35, batch_size=32, seq_len=100, clip=1.0, carry_state=True, optimizer=("adam", 0.002)
    ),
    "poems": dict(epochs=120, batch_size=64, clip=5.0, optimizer=("adam", 0.002)),
    "mnist": dict(epochs=150, batch_size=100, clip=1.0, optimizer=("rmsprop", 0.001)),
    "text8": dict(
        epochs=40,
        batch_size=128,
        seq_len=180,
        clip=1.0,
        carry_state=True,
        optimizer=("adam", 0.001),
    ),
}


def _name(task, model, n, cell):
    return f"{task}-{model.lower()}-{n}x{cell}.toml"


def test_one_config_per_table_row():
    expected = {_name(*row[:4]) for row in TABLES}
    assert len(expected) == 20
    present = {p.name for p in CONFIGS.glob("*.toml")}
    assert expected <= present
    assert present - expected == {"smoke.toml", "ptb-hmlstm-3x500.toml"}


@pytest.mark.parametrize("row", TABLES, ids=lambda r: _name(*r[:4])[:-5])
def test_row_config_matches_the_paper(row):
    task, model, n, cell, _ = row
    c = load_config(CONFIGS / _name(task, model, n, cell))
    assert c.task == task
    mc = model_config_for(c, VOCAB[task], 10 if task == "mnist" else None, KIND[task])
    assert mc == model_config(task, model, n, cell)  # the model nlstm params counts
    h = HYPER[task]
    for key in ("epochs", "batch_size", "seq_len", "clip", "carry_state"):
        if key in h:
            assert getattr(c, key) == h[key], key
    assert (c.optimizer.name, c.optimizer.lr) == h["optimizer"]
    if task == "mnist":
        assert c.optimizer.alpha == 0.9  # "the more commonly used decay rate of 0.9"
    if model == "NLSTM":
        assert mc.outer_activation == "identity"  # sigma_c of the paper's NLSTM runs


def test_smoke_config_loads():
    smoke = load_config(CONFIGS / "smoke.toml")
    assert smoke.task == "ptb" and smoke.model["core"] == "nlstm" and smoke.max_train_items


def test_hmlstm_config_has_the_hmrnn_papers_ptb_settings():
    """The HM-RNN paper, section 4.1: mini-batches of 64 sequences of 100, the last hidden state
    carried on, Adam at 0.002, gradient norm clipped at 1; 3 layers of 500 and a 500-unit
    embedding layer (layer norm stands in for the paper's batch norm)."""
    hm = load_config(CONFIGS / "ptb-hmlstm-3x500.toml")
    assert hm.task == "ptb"
    assert (hm.batch_size, hm.seq_len, hm.clip, hm.carry_state) == (64, 100, 1.0, True)
    assert (hm.optimizer.name, hm.optimizer.lr) == ("adam", 0.002)
    mc = model_config_for(hm, PTB_VOCAB, None, "stream")
    assert (mc.core, mc.num_layers, mc.hidden_size) == ("hmlstm", 3, 500)
    assert (mc.embedding_size, mc.layer_norm) == (500, True)
    (row,) = HMLSTM_ROWS
    assert mc == model_config(*row[:4])  # the model `nlstm params` counts
    comment = (CONFIGS / "ptb-hmlstm-3x500.toml").read_text()
    assert "section 4.1" in comment and "section 5" not in comment  # 5 is the conclusion
