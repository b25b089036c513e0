"""The fine-tuning study's synthetic instruction task: four operations on short word lists,
each with one exact answer, so generated answers are scored by exact match.

    first    "First word: if self dict"           -> "if"
    last     "Last word: if self dict"            -> "dict"
    count    "Count the words: if self dict"      -> "3"
    reverse  "Reverse the words: if self dict"    -> "dict self if"

Words are 27 single-token words of the stdlib tokenizer; lists hold 3 to 6 of them.
Writes into OUT: train.jsonl and val.jsonl (chat rows), pref.jsonl (DPO pairs on the
training prompts: the right answer against a typical wrong one), test_prompts.jsonl and
test_refs.jsonl (held-out prompts, none of them in train or val, and their answers).

    python experiments/finetune/make_data.py runs/finetune/data
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

WORDS = (
    "def class return import yield lambda while for if else try pass break print self list dict set "
    "name value key item data file path line text"
).split()
TASKS = {
    "first": ("First word: {}", lambda ws: ws[0], lambda ws: ws[-1]),
    "last": ("Last word: {}", lambda ws: ws[-1], lambda ws: ws[0]),
    "count": ("Count the words: {}", lambda ws: str(len(ws)), lambda ws: str(len(ws) + 1)),
    "reverse": ("Reverse the words: {}", lambda ws: " ".join(reversed(ws)), lambda ws: " ".join(ws)),
}


def example(rng: random.Random) -> tuple[str, str, str]:
    """(prompt, right answer, a typical wrong answer)."""
    task = rng.choice(sorted(TASKS))
    template, right, wrong = TASKS[task]
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
    return template.format(" ".join(words)), right(words), wrong(words)


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(out: str, n_train: int = 6000, n_val: int = 200, n_test: int = 200, seed: int = 0) -> None:
    rng = random.Random(seed)
    seen, splits = set(), {"train": [], "val": [], "test": []}
    for split, n in (("test", n_test), ("val", n_val), ("train", n_train)):
        while len(splits[split]) < n:
            prompt, right, wrong = example(rng)
            if split != "train" and prompt in seen:
                continue
            if split == "train" and prompt in {p for p, _, _ in splits["test"] + splits["val"]}:
                continue
            seen.add(prompt)
            splits[split].append((prompt, right, wrong))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    chat = lambda p, a: {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
    write(folder / "train.jsonl", [chat(p, a) for p, a, _ in splits["train"]])
    write(folder / "val.jsonl", [chat(p, a) for p, a, _ in splits["val"]])
    write(folder / "pref.jsonl", [{"prompt": p, "chosen": a, "rejected": w} for p, a, w in splits["train"]])
    write(folder / "test_prompts.jsonl", [{"prompt": p} for p, _, _ in splits["test"]])
    write(folder / "test_refs.jsonl", [{"prompt": p, "answer": a} for p, a, _ in splits["test"]])
    print(f"wrote {n_train} training, {n_val} validation and {n_test} test examples to {folder}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/finetune/data")
