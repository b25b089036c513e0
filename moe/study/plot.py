"""`moe plot DIR`: PNGs of a run from its metrics.jsonl.

DIR/plots/loss.png                 training and validation loss against step
DIR/plots/expert_load_layerN.png   fraction of tokens per expert over time, per layer
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moe import storage  # noqa: E402
from moe.training import metrics as metrics_lib  # noqa: E402


def plot_loss(train: list[dict], val: list[dict], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.5, label="train loss")
    ax.plot([r["step"] for r in train], [r["ce_loss"] for r in train], lw=1.0, label="train cross-entropy")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_expert_load(train: list[dict], out_dir: Path) -> list[Path]:
    records = [r for r in train if "expert_load" in r]
    if not records:
        return []
    steps = [r["step"] for r in records]
    load = np.asarray([r["expert_load"] for r in records])  # [steps, layers, experts]
    paths = []
    for layer in range(load.shape[1]):
        fig, ax = plt.subplots(figsize=(7, 3))
        image = ax.imshow(
            load[:, layer].T,
            aspect="auto",
            origin="lower",
            cmap="viridis",
            extent=(steps[0], steps[-1], -0.5, load.shape[2] - 0.5),
            vmin=0,
        )
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        ax.set_title(f"layer {layer}: fraction of routed tokens per expert (balanced = {1 / load.shape[2]:.3f})")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = out_dir / f"expert_load_layer{layer}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_run(run_dir: str | Path) -> list[Path]:
    train, val = metrics_lib.read(run_dir)
    if not train:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no training steps yet")
    out_dir = storage.location(run_dir) / "plots"
    with storage.Staging(out_dir) as staging:  # matplotlib writes local files; copied up for gs://
        folder = staging.local
        folder.mkdir(parents=True, exist_ok=True)
        written = [plot_loss(train, val, folder / "loss.png"), *plot_expert_load(train, folder)]
    return [out_dir / p.name for p in written]
