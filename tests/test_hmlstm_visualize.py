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
    cfg = ModelConfig(
        kind="char", core="hmlstm", hidden_size=6, num_layers=3, vocab_size=tok.vocab_size
    )
    model = build_model(cfg)
    with torch.no_grad():  # boundaries that fire sometimes: every layer above the first copies
        model.core.bias_l0[4 * 6] = 0.05  # layer 1's boundary bias; layer 2's stays 0
    path = tmp_path / "hm.pt"
    save_checkpoint(
        Checkpoint(
            task="ptb", model_config=cfg, model=model.state_dict(), tokenizer=tok.model_proto
        ),
        path,
    )
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
    # with these weights layer 2 does all three operations and layer 3 copies most of the time
    assert min(counts[1].values()) > 0 and counts[2]["copy"] > 0
    # Layer l copies at step t when its own boundary z_{t-1}^l is 0 (the top layer has none) and
    # the layer below's z_t^{l-1} is 0; a copying step leaves the layer's hidden state, hence its
    # norm, unchanged. Every COPY that `counts` reports after the first step is checked, both
    # through the shortcut that skips a layer whose whole batch copies (what evaluation runs)
    # and through eqs. (2)-(3) themselves (skip_copy off: what training and the export run).
    L = 3
    for skip_copy in (None, False):
        model.core.skip_copy = skip_copy
        z2, norms, counts2 = hmlstm_boundaries(model, tok.encode(text).ids)
        assert np.array_equal(z2, z) and counts2 == counts
        for n in range(1, L):
            copies = [
                t
                for t in range(1, len(text))
                if z[t, n - 1] < 0.5 and (n == L - 1 or z[t - 1, n] < 0.5)
            ]
            copied_first = z[0, n - 1] < 0.5  # from the zero state (z_{-1} = 0)
            assert len(copies) + copied_first == counts[n]["copy"] and copies
            for t in copies:
                assert np.isclose(norms[t, n], norms[t - 1, n]), (skip_copy, n, t)
