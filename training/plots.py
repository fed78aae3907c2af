"""Pictures of training: learning curves (the paper's Figures 5-8) and cell activations
(Figures 3-4).

* `plot_runs` reads runs' metrics.jsonl and draws their figures per epoch, several runs on one
  chart: BPC (PTB, text8), perplexity (poems), NLL and error (MNIST, two panels).
* `cell_activations` feeds a text through a character model one character at a time and keeps
  the memories after each character; `visualize_checkpoint` draws them as a PNG and a small
  self-contained HTML page (inline styles and data, no scripts to fetch). For an NLSTM the inner
  memory is shown as tanh(c~) (it is unbounded) and the outer memory c as it is (it is the inner
  LSTM's output, already in (-1, 1)), as the paper's Figure 3; for LSTMs every layer's tanh(c),
  as Figure 4.

matplotlib is imported inside the functions, through its object API with the Agg canvas (no
pyplot, no global backend switch), so importing this module costs nothing.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np
import torch

from training.trainer import read_metrics

# The paper's figures: which splits each task's curves show.
PAPER_SPLITS: dict[str, tuple[str, ...]] = {
    "ptb": ("valid", "test"),  # Figure 5
    "poems": ("train", "valid"),  # Figure 6
    "mnist": ("train", "valid"),  # Figure 7
    "text8": ("train", "valid"),  # Figure 8
}
SPLITS = ("train", "valid", "test")
STYLES = {"train": ":", "valid": "-", "test": "--"}
MAX_TEXT = 400  # characters `visualize` accepts (a wider picture is unreadable)


# ------------------------------------------------------------------------------------ curves
def _panels(evals: list[dict]) -> list[tuple[str, str, float]]:
    """(metric key, axis label, scale) per panel for the figures these records hold."""
    keys = {k.split("_", 1)[1] for e in evals for k in e if k.startswith(("valid_", "test_"))}
    if "bpc" in keys:
        return [("bpc", "bits per character", 1.0)]
    if "ppl" in keys:
        return [("ppl", "perplexity per character", 1.0)]
    if "nll" in keys:
        return [("nll", "NLL", 1.0), ("acc", "error (%)", -100.0)]
    raise ValueError("no bpc, ppl or nll figures in the metrics")


def plot_runs(
    runs: list[str | os.PathLike],
    out: str | os.PathLike | None = None,
    splits: list[str] | None = None,
    title: str | None = None,
) -> Path:
    """Learning curves of one or more runs on one chart; returns the PNG's path.

    runs: run folders (or their metrics.jsonl). splits: which of train/valid/test to draw
    (default: those of the paper's figure for the task). out: default FIRST_RUN/curves.png.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("plot needs at least one run")
    loaded = []
    for r in runs:
        r = Path(r)
        folder = r.parent if r.is_file() else r
        if not (folder / "metrics.jsonl").is_file() and not r.is_file():
            raise FileNotFoundError(f"no metrics.jsonl in {r}")
        run, evals = read_metrics(r)
        if not evals:
            raise ValueError(f"{r} has no evaluations yet")
        loaded.append((folder.name, (run or {}).get("task", "?"), evals))
    panels = _panels(loaded[0][2])
    for name, _, evals in loaded[1:]:
        if _panels(evals) != panels:
            raise ValueError(
                f"run {name} reports other figures than {loaded[0][0]}: cannot share a chart"
            )
    task = loaded[0][1]
    splits = list(splits or PAPER_SPLITS.get(task, SPLITS))
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"unknown split(s) {bad}; choose from {', '.join(SPLITS)}")

    fig = Figure(figsize=(7.5, 3.6 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    colors = [f"C{i % 10}" for i in range(len(loaded))]
    for p, (key, label, scale) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, p + 1)
        for color, (name, _, evals) in zip(colors, loaded, strict=True):
            for split in splits:
                pts = [(e["epoch"], e[f"{split}_{key}"]) for e in evals if f"{split}_{key}" in e]
                if not pts:
                    continue
                x, y_values = zip(*pts, strict=True)
                y = np.asarray(y_values, dtype=float)
                if scale < 0:  # accuracy -> error in percent
                    y = 100.0 + scale * y
                ax.plot(
                    x,
                    y,
                    STYLES[split],
                    color=color,
                    marker="." if len(x) < 30 else None,
                    label=f"{name} {split}",
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title or f"{task}: {', '.join(splits)} per epoch")
    out = Path(out) if out is not None else Path(runs[0]) / "curves.png"
    if out.is_dir():
        out = out / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


# ------------------------------------------------------------------------------------ cells
@torch.no_grad()
def cell_activations(model, ids: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The memories after each character: [(panel name, (T, H) values)], inner before outer.

    Runs the model's recurrent core one step at a time from a zero state (the state after step
    t is what the cell holds once it has read character t).
    """
    config = model.config
    if config.kind != "char":
        raise ValueError("cell pictures need a character model (ptb, text8 or poems)")
    model.eval()
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(-1, 1)  # (T, 1)
    state, steps = None, []
    for t in range(x.shape[0]):
        _, state = model.core(x[t : t + 1], state)  # state: per layer (h, c_0, ...)
        steps.append([[m[0].float().numpy().copy() for m in layer] for layer in state])
    panels = []
    if config.core == "nlstm":
        D = config.depth
        for n in range(config.num_layers):
            prefix = f"layer {n}: " if config.num_layers > 1 else ""
            for k in range(D - 1, -1, -1):  # innermost first, as the paper's Figure 3
                vals = np.stack([s[n][1 + k] for s in steps])  # (T, H)
                if k == D - 1:
                    name = "inner memory tanh(c~)" if D > 1 else "memory tanh(c)"
                    vals = np.tanh(vals)
                else:
                    name = "outer memory c" if k == 0 else f"memory c_{k}"
                panels.append((prefix + name, vals))
    else:
        for n in range(config.num_layers - 1, -1, -1):  # top layer first, as Figure 4
            vals = np.tanh(np.stack([s[n][1] for s in steps]))
            panels.append((f"layer {n + 1} tanh(c)" if config.num_layers > 1 else "tanh(c)", vals))
    return panels


def _show(ch: str) -> str:
    return {" ": "\u2423", "\n": "\u23ce", "\t": "\u21e5"}.get(ch, ch)


def _rgb(v: float) -> str:
    """Blue for positive, red for negative, darker for larger |v| (the paper's colours)."""
    v = max(-1.0, min(1.0, float(v)))
    target = (69, 117, 180) if v >= 0 else (215, 48, 39)
    a = abs(v)
    r, g, b = (round(255 + (t - 255) * a) for t in target)
    return f"rgb({r},{g},{b})"


def _html(title: str, subtitle: str, text: str, panels, cells: int) -> str:
    rows = []
    for name, vals in panels:
        rows.append(f"<h2>{html.escape(name)}</h2>")
        for i in range(min(cells, vals.shape[1])):
            spans = "".join(
                f'<span style="background:{_rgb(v)}" title="{v:+.3f}">'
                f"{html.escape(_show(ch)) if ch != ' ' else '&nbsp;'}</span>"
                for ch, v in zip(text, vals[:, i], strict=True)
            )
            rows.append(f'<div class="row"><span class="label">cell {i}</span>{spans}</div>')
    payload = {
        "text": text,
        "panels": [{"name": n, "values": np.round(v[:, :cells], 4).T.tolist()} for n, v in panels],
    }
    data = json.dumps(payload).replace("</", "<\\/")
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:1.5em}"
        ".row{font-family:monospace;font-size:15px;white-space:pre;line-height:1.6}"
        ".row span{padding:1px 0}.label{display:inline-block;width:5em;color:#555}"
        "h2{font-size:1em;margin:1.2em 0 .3em}"
        "</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p>"
        "<p>Blue: positive, red: negative; a darker shade is a larger magnitude. Hover a "
        "character for its value.</p>"
        + "\n".join(rows)
        + f'\n<script type="application/json" id="activations">{data}</script>'
        + "</body></html>\n"
    )


def draw_cells(panels, text: str, out_png: Path, cells: int, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    T = len(text)
    n = min(cells, panels[0][1].shape[1])
    fig = Figure(
        figsize=(max(6.0, 0.17 * T + 1.5), (0.3 * n + 0.9) * len(panels) + 0.6),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    for p, (name, vals) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, p + 1)
        ax.imshow(
            vals[:, :n].T, cmap="RdBu", vmin=-1, vmax=1, aspect="auto", interpolation="nearest"
        )
        ax.set_xticks(range(T))
        ax.set_xticklabels([_show(c) for c in text], fontsize=8, fontfamily="monospace")
        ax.set_yticks(range(n))
        ax.set_yticklabels([f"cell {i}" for i in range(n)], fontsize=7)
        ax.tick_params(length=0)
        ax.set_title(name, fontsize=9, loc="left")
    fig.suptitle(title, fontsize=10)
    fig.savefig(out_png, dpi=110)
    return out_png


def visualize_checkpoint(
    checkpoint: str | os.PathLike, text: str, out_dir: str | os.PathLike, cells: int = 7
) -> list[Path]:
    """Draw the cell activations of a checkpoint's model over `text`: [cells.png, cells.html]."""
    from serving.formats import Tokenizer
    from training.checkpoint import load_checkpoint

    if not text:
        raise ValueError("--text must not be empty")
    if len(text) > MAX_TEXT:
        raise ValueError(
            f"--text has {len(text)} characters; at most {MAX_TEXT} make a readable picture"
        )
    if cells < 1:
        raise ValueError(f"--cells must be >= 1, got {cells}")
    ckpt = load_checkpoint(checkpoint)
    if ckpt.model_config.kind != "char":
        raise ValueError(
            f"{checkpoint} is a {ckpt.task} glimpse classifier: cell pictures need a "
            "character model"
        )
    if ckpt.tokenizer is None:
        raise ValueError(f"{checkpoint} carries no tokenizer: cannot turn the text into ids")
    tok = Tokenizer.from_bytes(ckpt.tokenizer)
    enc = tok.encode(text)
    model = ckpt.build_model()
    panels = cell_activations(model, enc.ids)
    mc = ckpt.model_config
    desc = (
        f"{mc.core.upper()} {mc.num_layers}x{mc.hidden_size}"
        + (f", depth {mc.depth}" if mc.core == "nlstm" else "")
        + f", {ckpt.task}, step {ckpt.step}"
    )
    title = f"Cell activations per input character: {desc}"
    note = f"{Path(checkpoint).name}; first {min(cells, mc.hidden_size)} cells"
    if enc.unknown_chars:
        note += f"; {enc.unknown_chars} character(s) outside the vocabulary read as the unknown id"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = draw_cells(panels, text, out / "cells.png", cells, title)
    page = out / "cells.html"
    page.write_text(_html(title, note, text, panels, cells), encoding="utf-8")
    paths = [png, page]
    if mc.core == "hmlstm":
        z, norms, counts = hmlstm_boundaries(model, enc.ids)
        paths.append(draw_boundaries(z, norms, text, out / "boundaries.png", f"Boundaries: {desc}"))
        ops = out / "operations.txt"
        ops.write_text(
            "".join(
                f"layer {n + 1}: UPDATE {c['update']} COPY {c['copy']} FLUSH {c['flush']}\n"
                for n, c in enumerate(counts)
            ),
            encoding="utf-8",
        )
        paths.append(ops)
    return paths


# ------------------------------------------------------------------------------ HM-LSTM
@torch.no_grad()
def hmlstm_boundaries(model, ids: np.ndarray):
    """An HM-LSTM over `ids` from a zero state: boundaries z (T, L-1), hidden-state norms
    ||h^l|| (T, L), and the UPDATE / COPY / FLUSH counts per layer."""
    core = model.core.eval()
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(-1, 1)  # (T, 1)
    out, _, z, counts = core(x, return_boundaries=True)  # out (T, 1, L*H)
    L, H = core.num_layers, core.hidden_size
    norms = out[:, 0].reshape(-1, L, H).norm(dim=-1)  # (T, L)
    return z[:, 0].numpy(), norms.numpy(), counts


def draw_boundaries(z: np.ndarray, norms: np.ndarray, text: str, out_png: Path, title: str) -> Path:
    """The HM-RNN paper's Figure 3 (boundaries per layer, white = 1) above its Figure 5
    (each layer's ||h|| per character, with the boundaries marked)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    T, L = norms.shape
    fig = Figure(figsize=(max(6.0, 0.17 * T + 1.5), 0.45 * (2 * L - 1) + 2.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1, height_ratios=[max(L - 1, 1), L])
    ax1.imshow(z.T, cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax1.set_yticks(range(L - 1))
    ax1.set_yticklabels([f"z{j + 1}" for j in range(L - 1)], fontsize=8)
    ax1.set_title("boundaries (white: z = 1)", fontsize=9, loc="left")
    ax2.imshow(norms.T, cmap="viridis", aspect="auto", interpolation="nearest")
    for j in range(L - 1):  # mark layer j's boundaries on its own row of norms
        ts = np.nonzero(z[:, j] > 0.5)[0]
        ax2.scatter(ts, np.full(len(ts), j), marker="|", color="white", s=60)
    ax2.set_yticks(range(L))
    ax2.set_yticklabels([f"||h{j + 1}||" for j in range(L)], fontsize=8)
    ax2.set_title("hidden-state norms", fontsize=9, loc="left")
    for ax in (ax1, ax2):
        ax.set_xticks(range(T))
        ax.set_xticklabels([_show(c) for c in text], fontsize=8, fontfamily="monospace")
        ax.tick_params(length=0)
    fig.suptitle(title, fontsize=10)
    fig.savefig(out_png, dpi=110)
    return out_png


__all__ = [
    "cell_activations",
    "draw_boundaries",
    "draw_cells",
    "hmlstm_boundaries",
    "plot_runs",
    "visualize_checkpoint",
]
