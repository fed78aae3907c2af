"""Tiny random exported models for the serving tests and the quick benchmarks: a character
model over a few lines' characters (`export_random_char`) and the tests' pair of a character
model and an MNIST glimpse classifier (`export_tiny_models`). Needs torch (the train extra);
the servers that load what it writes do not.
"""

from __future__ import annotations

from pathlib import Path

# the tiny character model's training text: its vocabulary is these characters and the newline
TEXT = ["the cat sat on the mat", "a dog ran in the park", "we saw the stars at night"]
CHAR_MODEL, GLIMPSE_MODEL = "tiny-char", "tiny-mnist"


def export_random_char(
    folder: Path, hidden: int, lines: list[str], metrics: dict | None = None
) -> Path:
    """Export a random NLSTM character model (`hidden` cells, depth 2, a PTB-style tokenizer of
    the characters of `lines`, torch seeded with 0) to `folder`; returns it."""
    import torch

    from training.data.tokenizer import train_char_tokenizer
    from training.export import export_model
    from training.models import ModelConfig, build_model

    torch.manual_seed(0)
    tok = train_char_tokenizer(lines, newline=True)
    model = build_model(
        ModelConfig(
            kind="char", core="nlstm", hidden_size=hidden, depth=2, vocab_size=tok.vocab_size
        )
    )
    export_model(
        model.eval(),
        folder,
        task="ptb",
        tokenizer=tok.model_proto,
        metrics=metrics,
        sequence="never",
    )
    return Path(folder)


def export_tiny_models(root: Path) -> Path:
    """Export two random models under `root` and return it: CHAR_MODEL (NLSTM 16 cells, depth
    2, a PTB-style tokenizer of TEXT) and GLIMPSE_MODEL (NLSTM 8 cells, depth 2, MNIST)."""
    from training.export import export_model
    from training.models import ModelConfig, build_model

    root = Path(root)
    export_random_char(root / CHAR_MODEL, 16, TEXT, metrics={"valid_bpc": 3.0})
    # torch's generator goes on from the character model's
    glimpse = build_model(ModelConfig(kind="glimpse", core="nlstm", hidden_size=8, depth=2))
    export_model(
        glimpse.eval(), root / GLIMPSE_MODEL, task="mnist", tokenizer=None, sequence="never"
    )
    return root
