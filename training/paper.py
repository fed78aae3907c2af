"""The models of the paper's Tables 1-4, as model configs, with the paper's Params column, and
the HM-LSTM baseline's PTB model.

Used by `nlstm params` and the per-row training configs. The paper's "n" is the number of
stacked layers for LSTMs and the nesting depth for the NLSTM (a single NLSTM layer of depth 2:
its parameter count equals the 2-layer stacked LSTM's, as the paper says). For the HM-LSTM, n
is the number of layers.

The HM-LSTM row (HMLSTM_ROWS) is the PTB model of the HM-RNN paper (Chung, Ahn & Bengio,
section 4.1): 3 layers of 500, a 500-unit embedding layer in the output module, and layer
normalisation in place of the paper's batch normalisation, as configs/ptb-hmlstm-3x500.toml.
That paper gives no parameter count, so the row has no Params figure to match.

Vocabularies, as the paper's counts imply: PTB 50 symbols, text8 27, MNIST glimpses 49 inputs
and 10 classes. The poems vocabulary is not stated; 5,367 reproduces every Params entry of
Table 2 (868k, 1.1M, 877k, 885k, 877k).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from training.models import ModelConfig, build_model, count_parameters

PAPER_POEMS_VOCAB = 5367
PTB_VOCAB = 50
TEXT8_VOCAB = 27

# (task, model, n, cell size, paper's Params column)
TABLES = [
    ("ptb", "LSTM", 1, 1000, "4.25M"),
    ("ptb", "LSTM", 1, 1050, "4.68M"),
    ("ptb", "LSTM", 2, 600, "4.47M"),
    ("ptb", "LSTM", 3, 450, "4.17M"),
    ("ptb", "NLSTM", 2, 600, "4.47M"),
    ("poems", "LSTM", 1, 32, "868k"),
    ("poems", "LSTM", 1, 40, "1.1M"),
    ("poems", "LSTM", 2, 32, "877k"),
    ("poems", "LSTM", 3, 32, "885k"),
    ("poems", "NLSTM", 2, 32, "877k"),
    ("mnist", "LSTM", 1, 100, "61.0k"),
    ("mnist", "LSTM", 1, 130, "94.9k"),
    ("mnist", "LSTM", 2, 75, "83.6k"),
    ("mnist", "LSTM", 3, 75, "85.1k"),
    ("mnist", "NLSTM", 2, 75, "83.6k"),
    ("text8", "LSTM", 1, 2000, "16.28M"),
    ("text8", "LSTM", 1, 2100, "17.93M"),
    ("text8", "LSTM", 2, 1200, "17.45M"),
    ("text8", "LSTM", 3, 950, "18.19M"),
    ("text8", "NLSTM", 2, 1200, "17.45M"),
]

# (task, model, n layers, cell size, paper's Params: none given). Kept apart from TABLES, which
# are the NLSTM paper's rows, one training config each under the NLSTM paper's hyperparameters.
HMLSTM_ROWS = [
    ("ptb", "HM-LSTM", 3, 500, None),
]

# The one row whose Params entry no model of its description matches (see `note`).
MISMATCHED = {("mnist", "LSTM", 3, 75)}


def model_config(
    task: str, model: str, n: int, cell: int, poems_vocab: int = PAPER_POEMS_VOCAB
) -> ModelConfig:
    """The ModelConfig of one table row (TABLES or HMLSTM_ROWS)."""
    core = {"LSTM": "lstm", "NLSTM": "nlstm", "HM-LSTM": "hmlstm"}[model]
    if core == "hmlstm":  # the HM-RNN paper's PTB model: embedding as wide as a layer, layer norm
        vocab = {"ptb": PTB_VOCAB, "text8": TEXT8_VOCAB}[task]
        return ModelConfig(
            kind="char",
            core=core,
            hidden_size=cell,
            num_layers=n,
            vocab_size=vocab,
            embedding_size=cell,
            layer_norm=True,
        )
    layers, depth = (1, n) if core == "nlstm" else (n, 1)
    if task == "mnist":
        return ModelConfig(
            kind="glimpse", core=core, hidden_size=cell, num_layers=layers, depth=depth
        )
    vocab = {"ptb": PTB_VOCAB, "text8": TEXT8_VOCAB, "poems": poems_vocab}[task]
    return ModelConfig(
        kind="char", core=core, hidden_size=cell, num_layers=layers, depth=depth, vocab_size=vocab
    )


def round_like(count: int, paper: str) -> str:
    """Round `count` to the precision and unit of the paper's entry ("4.47M", "868k", "61.0k")."""
    unit = paper[-1]
    scale = {"k": 1e3, "M": 1e6}[unit]
    decimals = len(paper[:-1].split(".")[1]) if "." in paper else 0
    return f"{count / scale:.{decimals}f}{unit}"


@dataclass
class Row:
    task: str
    model: str
    n: int
    cell_size: int
    params: int
    paper_params: str | None  # None: the paper gives no count
    matches: bool | None  # None: nothing to match
    note: str

    def as_dict(self) -> dict:
        return asdict(self)


def paper_rows(poems_vocab: int = PAPER_POEMS_VOCAB) -> list[Row]:
    rows = []
    for task, model, n, cell, paper in TABLES + HMLSTM_ROWS:
        cfg = model_config(task, model, n, cell, poems_vocab)
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            params = count_parameters(build_model(cfg))
        if paper is None:
            note = "no Params figure: the HM-RNN paper gives none"
            rows.append(Row(task, model, n, cell, params, None, None, note))
            continue
        matches = round_like(params, paper) == paper
        note = "" if matches else f"rounds to {round_like(params, paper)}, not the paper's {paper}"
        if (task, model, n, cell) in MISMATCHED:
            note += (
                "; no 3-layer LSTM of 75 cells matches 85.1k (one bias per gate gives the count "
                "printed here, two biases more): the paper's entry cannot be reproduced"
            )
        rows.append(Row(task, model, n, cell, params, paper, matches, note.lstrip("; ")))
    return rows
