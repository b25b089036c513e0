"""Score the fine-tuning study's runs: answers to the held-out prompts (greedy, through the
instruct template), exact-match accuracy overall and per task, validation loss on answers,
training tokens/s, trainable parameters, Adam state, and `moe compare` win rates of each
run against LoRA-on-experts of the same seed. Writes results.json and results.md.

    python experiments/finetune/evaluate.py experiments/finetune runs/finetune/data \
        runs/sweeps/finetune runs/sweeps/finetune-dpo

--reference=VARIANT (before the run folders) compares against another variant than lora-experts.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from moe import cli
from moe import config as config_lib
from moe.training.metrics import read
from moe.training.trainable import counts
from moe.tune import compare as compare_lib

REFERENCE = ["lora-experts"]  # main() may replace it


def answers_for(run: Path, data: Path, out: Path) -> Path:
    path = out / "answers" / f"{run.name}.jsonl"
    if not path.is_file():
        code = cli.main(
            [
                "generate",
                str(run),
                "--prompts",
                str(data / "test_prompts.jsonl"),
                "--chat",
                "--max-new-tokens",
                "12",
                "--batch-size",
                "50",
                "--out",
                str(path),
            ]
        )
        assert code == 0, f"moe generate failed for {run}"
    return path


def by_task(answers: dict, refs: dict) -> dict:
    tasks = {}
    for prompt, ref in refs.items():
        task = prompt.split(":")[0]
        tasks.setdefault(task, []).append(answers.get(prompt, "").strip() == ref.strip())
    return {task: sum(v) / len(v) for task, v in sorted(tasks.items())}


def row(run: Path, answers_path: Path, data: Path) -> dict:
    cfg = config_lib.load(run / "config.yaml")
    train, val = read(run)
    refs = compare_lib.read_answers(data / "test_refs.jsonl", "answer")
    answers = compare_lib.read_answers(answers_path)
    n = counts(cfg)
    variant, seed = run.name.rsplit("_seed-", 1)
    out = {
        "run": run.name,
        "variant": variant,
        "seed": int(seed),
        "accuracy": compare_lib.accuracy(answers, refs),
        "by_task": by_task(answers, refs),
        "val_loss": val[-1]["val_loss"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[5:]),
        "trainable": n["trainable"],
        "adam_state_mb": 2 * 4 * n["trainable"] / 2**20,
    }
    reference = answers_path.parent / f"{REFERENCE[0]}_seed-{seed}.jsonl"
    if variant != REFERENCE[0]:
        vs = compare_lib.compare(answers_path, reference, "exact", data / "test_refs.jsonl")
        out["vs_lora_experts"] = {
            k: vs[k] for k in ("wins", "ties", "losses", "win_rate", "win_rate_ties_half", "interval_95")
        }
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| run | accuracy | first / last / count / reverse | val loss | tokens/s | trainable | Adam state | "
        f"vs {REFERENCE[0]} (W/T/L, win rate with ties half) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["by_task"]
        vs = r.get("vs_lora_experts")
        versus = (
            "(reference)"
            if vs is None
            else (f"{vs['wins']}/{vs['ties']}/{vs['losses']}, {vs['win_rate_ties_half']:.2f}")
        )
        lines.append(
            f"| {r['run']} | {r['accuracy']:.3f} | {t.get('First word', 0):.2f} / {t.get('Last word', 0):.2f}"
            f" / {t.get('Count the words', 0):.2f} / {t.get('Reverse the words', 0):.2f} | "
            f"{r['val_loss']:.4f} | {r['tokens_per_s']:.0f} | {r['trainable']:,} | "
            f"{r['adam_state_mb']:.2f} MB | {versus} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy per task and overall, one bar per run (seeds side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = ["First word", "Last word", "Count the words", "Reverse the words"]
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(rows)
    colors = plt.get_cmap("tab20").colors
    for i, r in enumerate(rows):
        values = [r["by_task"].get(t, 0.0) for t in tasks] + [r["accuracy"]]
        ax.bar([x + i * width for x in range(len(values))], values, width, label=r["run"], color=colors[i % 20])
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks) + 1)], [t.split()[0] for t in tasks] + ["all"])
    ax.set_ylabel("exact-match accuracy (200 held-out prompts)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out: str, data: str, *runs_dirs: str) -> None:
    data, out = Path(data), Path(out)
    if runs_dirs and runs_dirs[0].startswith("--reference="):
        REFERENCE[0], runs_dirs = runs_dirs[0].split("=", 1)[1], runs_dirs[1:]
    runs = [
        p
        for d in runs_dirs
        for p in sorted(Path(d).iterdir())
        if (p / "metrics.jsonl").is_file() and "_seed-" in p.name
    ]
    paths = {run: answers_for(run, data, out) for run in runs}  # all answers first: comparisons need them
    rows = [row(run, paths[run], data) for run in runs]
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "results.md").write_text(table(rows) + "\n")
    plot(rows, out / "accuracy.png")
    print(table(rows))


if __name__ == "__main__":
    main(*sys.argv[1:])
