"""`nlstm visualize` on an HM-LSTM: boundaries and norms (the HM-RNN paper's Figures 3 and 5)
and the UPDATE / COPY / FLUSH counts per layer."""

from __future__ import annotations

import numpy as np
import torch

from training.checkpoint import Checkpoint, save_checkpoint
from training.cli import main
from training.data.tokenizer import train_char_tokenizer
from training.models import ModelConfig, build_model
from training.plots import hmlstm_boundaries


def test_visualize_hmlstm(tmp_path, capsys):
    torch.manual_seed(0)
    tok = train_char_tokenizer(["the cat sat on the mat", "a dog ran"], newline=True)
    cfg = ModelConfig(kind="char", core="hmlstm", hidden_size=6, num_layers=3, vocab_size=tok.vocab_size)
    model = build_model(cfg)
    with torch.no_grad():  # boundaries that fire sometimes
        for n in range(2):
            getattr(model.core, f"bias_l{n}")[4 * 6] = 0.05
    path = tmp_path / "hm.pt"
    save_checkpoint(Checkpoint(task="ptb", model_config=cfg, model=model.state_dict(), tokenizer=tok.model_proto), path)
    text = "the cat sat"
    assert main(["visualize", str(path), "--text", text, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert (tmp_path / "out" / "boundaries.png").read_bytes()[:4] == b"\x89PNG"
    ops = [line for line in printed if line.startswith("layer ")]
    assert len(ops) == 3
    z, norms, counts = hmlstm_boundaries(model, tok.encode(text).ids)
    assert z.shape == (len(text), 2) and norms.shape == (len(text), 3)
    for n, c in enumerate(counts):  # every step of every layer is one of the three operations
        assert sum(c.values()) == len(text)
        assert ops[n] == f"layer {n + 1}: UPDATE {c['update']} COPY {c['copy']} FLUSH {c['flush']}"
    assert counts[0]["copy"] == 0  # the first layer never copies
    # a copying step leaves the layer's hidden state, hence its norm, unchanged
    for t in range(1, len(text)):
        if z[t, 0] < 0.5 and z[t - 1, 1] < 0.5:
            assert np.isclose(norms[t, 1], norms[t - 1, 1])
