"""`moe compare A.jsonl B.jsonl --judge NAME`: two models' answers to the same prompts,
judged pair by pair (the OpenPipe head-to-head).

Inputs are `moe generate --prompts ... --out` files (one {"prompt", "completion"} per line);
rows are matched by prompt. Judges:
    exact         the answer equal to the reference (after stripping whitespace) wins
    f1            higher token F1 against the reference wins (equal: tie)
    cmd:COMMAND   any program: reads {"prompt", "a", "b", "reference"} as JSON on stdin,
                  prints A, B or tie (an LLM judge, where one is available)
The reference answers come from --references FILE.jsonl ({"prompt", "answer"} per line).
Reported: wins, ties, losses of A, A's win rate without ties and with ties counted half,
and a bootstrap 95% interval of the latter.
"""

from __future__ import annotations

import collections
import json
import shlex
import subprocess
from pathlib import Path

import numpy as np

from moe import progress
from moe.data.pipeline import read_jsonl


class CompareError(ValueError):
    """Inputs that cannot be compared; the message says which file and why."""


def read_answers(path: str | Path, field: str = "completion") -> dict[str, str]:
    """{prompt: answer} of a JSONL file of {"prompt", field} lines."""
    return {row["prompt"]: row[field] for row in read_jsonl(path, ("prompt", field), CompareError)}


def token_f1(answer: str, reference: str) -> float:
    a, r = answer.split(), reference.split()
    common = sum((collections.Counter(a) & collections.Counter(r)).values())
    if not a or not r or common == 0:
        return float(a == r)
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _by_score(score_a: float, score_b: float) -> str:
    return "A" if score_a > score_b else "B" if score_b > score_a else "tie"


def make_judge(name: str):
    """judge(prompt, a, b, reference) -> "A" | "B" | "tie"."""
    if name == "exact":
        return lambda p, a, b, ref: _by_score(float(a.strip() == ref.strip()), float(b.strip() == ref.strip()))
    if name == "f1":
        return lambda p, a, b, ref: _by_score(token_f1(a, ref), token_f1(b, ref))
    if name.startswith("cmd:"):
        command = shlex.split(name[4:])

        def judge(prompt, a, b, ref):
            done = subprocess.run(
                command,
                input=json.dumps({"prompt": prompt, "a": a, "b": b, "reference": ref}),
                capture_output=True,
                text=True,
                check=False,
            )
            verdict = done.stdout.strip()
            if done.returncode or verdict not in ("A", "B", "tie"):
                raise CompareError(
                    f"judge {name[4:]!r} must print A, B or tie and exit 0; it printed "
                    f"{verdict[:80]!r} (exit {done.returncode})"
                )
            return verdict

        return judge
    raise CompareError(f"unknown judge {name!r}; use exact, f1 or cmd:COMMAND")


def summarize(verdicts: list[str], seed: int = 0, samples: int = 2000) -> dict:
    wins, ties, losses = (verdicts.count(v) for v in ("A", "tie", "B"))
    n = len(verdicts)
    score = np.array([1.0 if v == "A" else 0.5 if v == "tie" else 0.0 for v in verdicts])
    rng = np.random.default_rng(seed)
    boot = score[rng.integers(0, n, (samples, n))].mean(axis=1) if n else np.zeros(1)
    return {
        "n": n,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "win_rate": wins / (wins + losses) if wins + losses else None,
        "win_rate_ties_half": float(score.mean()) if n else None,
        "interval_95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
    }


def accuracy(answers: dict[str, str], references: dict[str, str]) -> float:
    """Exact-match accuracy (whitespace stripped) over the prompts with a reference."""
    scored = [answers.get(p, "").strip() == ref.strip() for p, ref in references.items()]
    return sum(scored) / max(len(scored), 1)


def compare(a_path, b_path, judge: str, references=None) -> dict:
    a, b = read_answers(a_path), read_answers(b_path)
    refs = read_answers(references, "answer") if references else {}
    if judge in ("exact", "f1") and not refs:
        raise CompareError(f"judge {judge} scores against reference answers: pass --references FILE.jsonl")
    prompts = [p for p in a if p in b]
    if not prompts:
        raise CompareError(f"{a_path} and {b_path} share no prompt; generate both from the same prompts file")
    missing = [p for p in prompts if judge in ("exact", "f1") and p not in refs]
    if missing:
        raise CompareError(f"{len(missing)} prompts have no reference answer, e.g. {missing[0][:60]!r}")
    fn = make_judge(judge)
    judged = progress.bar(prompts, desc=f"judge {judge}", unit="prompt")
    result = summarize([fn(p, a[p], b[p], refs.get(p, "")) for p in judged])
    if refs:
        result.update(accuracy_a=accuracy(a, refs), accuracy_b=accuracy(b, refs))
    return result
