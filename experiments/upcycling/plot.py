"""The upcycling study's table and plots: validation loss against total training tokens and
against total training FLOPs, the dense pretraining counted for the runs that continue it.

    python experiments/upcycling/plot.py experiments/upcycling runs/upcycling/dense runs/sweeps/upcycling
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moe import config as config_lib
from moe.model.params import count_params
from moe.training import step as train_lib
from moe.training.metrics import read

CONTINUES = ("dense", "upcycled")  # variants that start from the dense pretraining


def _flops_per_token(cfg) -> float:
    return train_lib.flops_per_token(cfg, count_params(cfg.model).active)


def curves(pretrain: Path, sweep: Path) -> dict:
    base_cfg = config_lib.load(pretrain / "config.yaml")
    tokens_per_step = base_cfg.train.batch_size * base_cfg.train.seq_len
    base_steps = base_cfg.train.steps
    base_flops = base_steps * tokens_per_step * _flops_per_token(base_cfg)
    out = {"pretrain": {"steps": base_steps, "val": read(pretrain)[1], "tokens_per_step": tokens_per_step}}
    for run in sorted(p for p in sweep.iterdir() if (p / "metrics.jsonl").is_file()):
        cfg = config_lib.load(run / "config.yaml")
        variant = run.name.rsplit("_seed-", 1)[0]
        offset = base_steps if variant in CONTINUES else 0
        fpt = _flops_per_token(cfg)
        points = [
            {
                "step": r["step"],
                "tokens": (offset + r["step"]) * tokens_per_step,
                "flops": (base_flops if offset else 0.0) + r["step"] * tokens_per_step * fpt,
                "val_loss": r["val_loss"],
            }
            for r in read(run)[1]
        ]
        out[run.name] = {"variant": variant, "points": points}
    return out


def table(data: dict) -> str:
    runs = {k: v for k, v in data.items() if k != "pretrain"}
    steps = sorted({p["tokens"] for v in runs.values() for p in v["points"]})
    lines = ["| total tokens (M) | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for tokens in steps:
        cells = []
        for v in runs.values():
            hit = [p for p in v["points"] if p["tokens"] == tokens]
            cells.append(f"{hit[0]['val_loss']:.3f}" if hit else "")
        lines.append(f"| {tokens / 1e6:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"dense": "tab:blue", "upcycled": "tab:red", "scratch": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    pre = data["pretrain"]
    for ax, key, label in [(axes[0], "tokens", "total training tokens"), (axes[1], "flops", "total training FLOPs")]:
        if key == "tokens":
            ax.plot(
                [r["step"] * pre["tokens_per_step"] for r in pre["val"]],
                [r["val_loss"] for r in pre["val"]],
                color="gray",
                label="dense pretraining",
            )
        for name, v in data.items():
            if name == "pretrain":
                continue
            ax.plot(
                [p[key] for p in v["points"]],
                [p["val_loss"] for p in v["points"]],
                color=colors[v["variant"]],
                linestyle="-" if name.endswith("seed-0") else "--",
                label=name,
            )
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        ax.set_ylim(top=6.5)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out: str, pretrain: str, sweep: str) -> None:
    data = curves(Path(pretrain), Path(sweep))
    out_dir = Path(out)
    (out_dir / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    (out_dir / "results.md").write_text(table(data) + "\n")
    plot(data, out_dir / "val_loss.png")
    print(table(data))


if __name__ == "__main__":
    main(*sys.argv[1:])
