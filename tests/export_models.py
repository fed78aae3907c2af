"""The small random models the export tests build (tests/test_export.py,
tests/test_export_graphs.py): their text, hidden size and parity tolerance."""

from __future__ import annotations

import torch

from training.models import ModelConfig, build_model

TEXT = "the quick brown fox jumps over the lazy dog. PACK MY BOX, 0123456789!"
H = 12  # hidden size of the test models
TOL = 1e-5  # every logit and state value, over 200 steps


def make_model(tok, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=H, vocab_size=tok.vocab_size, **kw)
    return build_model(cfg)
