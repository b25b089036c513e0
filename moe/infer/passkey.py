"""Passkey retrieval (the Mixtral paper's long-context test, built as landmark attention
built it): an instruction, filler repeated around "The pass key is N. Remember it. N is the
pass key." at a chosen depth, then "What is the pass key? The pass key is"; the model must
continue with N (greedy, exact match of the digits).

Also writes a training corpus of the same texts (each ending in the answer) for the
experiments/passkey study, which trains tiny models to do the task at short lengths.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from moe import progress
from moe.infer.decode import generate

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
ANSWER_TOKENS = 12  # new tokens generated for the answer


def key_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey_text(n_filler: int, depth: float, key: int) -> str:
    """The prompt with n_filler filler sentences, round(depth * n_filler) of them before the key."""
    before = int(round(depth * n_filler))
    lines = [
        INSTRUCTION,
        " ".join([FILLER] * before),
        key_line(key),
        " ".join([FILLER] * (n_filler - before)),
        QUESTION,
    ]
    return "\n".join(line for line in lines if line)


@dataclasses.dataclass(frozen=True)
class Sizer:
    """Token counts of the prompt's parts under a tokenizer, to hit a target length."""

    fixed: int  # bos + instruction + key line + question
    per_filler: int

    @classmethod
    def of(cls, sp) -> Sizer:
        one = len(sp.encode(passkey_text(1, 0.0, 12345)))
        two = len(sp.encode(passkey_text(2, 0.0, 12345)))
        return cls(fixed=1 + 2 * one - two, per_filler=two - one)

    def fillers_for(self, n_tokens: int) -> int:
        """Filler sentences so the prompt (bos included) is at most n_tokens long."""
        return max(0, (n_tokens - self.fixed) // self.per_filler)


def random_key(rng: np.random.Generator, digits: int = 5) -> int:
    return int(rng.integers(10 ** (digits - 1), 10**digits))


def answer_of(completion: str) -> str | None:
    """The first run of digits the model produced, or None."""
    match = re.search(r"\d+", completion)
    return match.group(0) if match else None


def write_corpus(sp, out: str | Path, n_docs: int, max_tokens: int, seed: int = 0) -> Path:
    """JSONL of passkey texts with their answers (" N."), lengths uniform up to max_tokens
    tokens (the answer included) and depths uniform in [0, 1]."""
    sizer, rng = Sizer.of(sp), np.random.default_rng(seed)
    most = sizer.fillers_for(max_tokens - 8)  # room for " N." and eos
    if most < 1:
        raise ValueError(
            f"max_tokens {max_tokens} leaves no room for filler; use at least {sizer.fixed + sizer.per_filler + 8}"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for _ in range(n_docs):
            key = random_key(rng)
            text = passkey_text(int(rng.integers(0, most + 1)), float(rng.random()), key)
            f.write(json.dumps({"text": f"{text} {key}."}) + "\n")
    return out


def evaluate(
    cfg, params, sp, lengths: list[int], depths: list[float], trials: int, seed: int = 0, batch_size: int = 8
) -> list[dict]:
    """One record per (length, depth, trial): greedy answer vs the key, exact digits."""
    sizer, rng = Sizer.of(sp), np.random.default_rng(seed)
    records = []
    for length in progress.bar(lengths, desc="passkey lengths", unit="length"):
        cases = [(depth, trial, random_key(rng)) for depth in depths for trial in range(trials)]
        n_filler = sizer.fillers_for(length)
        prompts = [[sp.bos_id(), *sp.encode(passkey_text(n_filler, d, key))] for d, _, key in cases]
        outputs = generate(cfg, params, prompts, max_new_tokens=ANSWER_TOKENS, batch_size=batch_size)
        for (depth, trial, key), prompt, out in zip(cases, prompts, outputs):
            answer = answer_of(sp.decode([t for t in out if t != cfg.eos_id]))
            records.append(
                {
                    "length": length,
                    "prompt_tokens": len(prompt),
                    "depth": depth,
                    "trial": trial,
                    "key": key,
                    "answer": answer,
                    "correct": answer == str(key),
                }
            )
    return records


def accuracy_grid(records: list[dict]) -> tuple[list[int], list[float], np.ndarray]:
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    grid = np.zeros((len(lengths), len(depths)))
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            cell = [r["correct"] for r in records if r["length"] == length and r["depth"] == depth]
            grid[i, j] = np.mean(cell)
    return lengths, depths, grid


def format_table(records: list[dict]) -> str:
    lengths, depths, grid = accuracy_grid(records)
    head = "| length \\ depth | " + " | ".join(f"{d:.0%}" for d in depths) + " | mean |"
    lines = [head, "|" + "---|" * (len(depths) + 2)]
    for length, row in zip(lengths, grid):
        lines.append(f"| {length} | " + " | ".join(f"{v:.2f}" for v in row) + f" | {row.mean():.2f} |")
    return "\n".join(lines)


def plot_heatmap(records: list[dict], out: str | Path, title: str) -> Path:
    import matplotlib  # its Agg backend chosen before pyplot loads, only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths, grid = accuracy_grid(records)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(depths), 1.0 + 0.45 * len(lengths)))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("depth of the key in the prompt")
    ax.set_ylabel("prompt length (tokens)")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
