"""The pictures of `moe analyze` (moe/study/routing.py): expert load per domain as a heatmap per
layer (the Mixtral paper's Figure 7), and sample texts with each token colored by its
first-choice expert (its Figure 8), as HTML and PNG."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib
import numpy as np


def token_html(pieces: list[str], experts: list[int], n_experts: int) -> str:
    colors = palette(n_experts)
    spans = [
        f'<span style="background:{colors[e]}" title="expert {e}">{html.escape(p)}</span>'
        for p, e in zip(pieces, experts)
    ]
    return "<pre style='white-space:pre-wrap'>" + "".join(spans) + "</pre>"


def palette(n: int) -> list[str]:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [matplotlib.colors.to_hex(cmap(i % cmap.N), keep_alpha=False) for i in range(n)]


def _pyplot():
    matplotlib.use("Agg")  # no display: the backend is chosen before pyplot loads
    import matplotlib.pyplot as plt

    return plt


def heatmaps(result: dict, out_dir: Path) -> None:
    """load_layer<L>.png: domains x experts, the fraction of copies, uniform rate marked."""
    plt = _pyplot()
    e = result["n_experts"]
    for layer, per in result["layers"].items():
        names = list(per)
        grid = np.array([per[n]["load"] for n in names])  # [domains, experts]
        fig, ax = plt.subplots(figsize=(1.0 + 0.6 * e, 1.2 + 0.45 * len(names)))
        image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0)
        for (i, j), value in np.ndenumerate(grid):
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value < grid.max() * 0.6 else "black",
            )
        ax.set_xticks(range(e), [str(i) for i in range(e)])
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("expert")
        ax.set_title(f"layer {layer}: fraction of token copies (uniform {1 / e:.3f})", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.04)
        fig.tight_layout()
        fig.savefig(out_dir / f"load_layer{layer}.png", dpi=110)
        plt.close(fig)


def _pieces(sp, ids: list[int]) -> list[str]:
    """Each token's text (the bos token shown as <s>), so the pieces spell the document."""
    out = []
    for i in range(len(ids)):
        if ids[i] == sp.bos_id():
            out.append("<s>")
            continue
        before = sp.decode(ids[1:i]) if i > 1 else ""
        out.append(sp.decode(ids[1 : i + 1])[len(before) :])
    return out


def render_tokens(samples: dict, sp, layers: list[int], n_experts: int, out_dir: Path) -> None:
    """tokens.html (every layer) and tokens_layer<L>.png of one sample text per domain;
    samples: name -> (token ids, choices [layers, tokens, top_k])."""
    sections = ["<html><body><h1>First-choice expert of each token</h1>"]
    colors = palette(n_experts)
    sections.append(
        "<p>" + " ".join(f'<span style="background:{c}">expert {i}</span>' for i, c in enumerate(colors)) + "</p>"
    )
    for layer in layers:
        sections.append(f"<h2>layer {layer}</h2>")
        for name, (ids, choices) in samples.items():
            n = min(len(ids), choices.shape[1])
            sections.append(
                f"<h3>{name}</h3>" + token_html(_pieces(sp, ids[:n]), choices[layer, :n, 0].tolist(), n_experts)
            )
        _png(samples, sp, layer, colors, out_dir / f"tokens_layer{layer}.png")
    (out_dir / "tokens.html").write_text("\n".join(sections) + "</body></html>\n")


def _png(samples: dict, sp, layer: int, colors: list[str], path: Path, per_line: int = 16) -> None:
    plt = _pyplot()
    rows = []
    for name, (ids, choices) in samples.items():
        n = min(len(ids), choices.shape[1])
        pieces, experts = _pieces(sp, ids[:n]), choices[layer, :n, 0]
        rows.append((f"{name}:", None))
        for start in range(0, n, per_line):
            rows.append(list(zip(pieces[start : start + per_line], experts[start : start + per_line])))
    fig, ax = plt.subplots(figsize=(14, 0.28 * len(rows) + 0.6))
    ax.set_xlim(0, per_line)
    ax.set_ylim(len(rows), -0.5)
    ax.axis("off")
    for y, row in enumerate(rows):
        if isinstance(row, tuple):
            ax.text(0, y, row[0], fontsize=8, weight="bold", va="center")
            continue
        for x, (piece, expert) in enumerate(row):
            shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in piece)  # \n, \x00: no glyph
            text = shown.replace("$", r"\$")[:10] or " "
            ax.text(
                x,
                y,
                text,
                fontsize=7,
                family="monospace",
                va="center",
                bbox=dict(boxstyle="square,pad=0.15", facecolor=colors[int(expert)], edgecolor="none"),
            )
    ax.set_title(f"layer {layer}: tokens colored by first-choice expert", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
