"""The quantization-error table: for each model, held-out perplexity in float32, bfloat16 and
every weight format (quantized with `moe quantize`, computing in float32), the relative
error against float32 and against int8, bytes per parameter, batch-1 decode tokens/s, and
how many greedy tokens match float32's before the first difference. Writes results.json
and results.md in OUT.

    python experiments/quantization/study.py OUT NAME=SOURCE [NAME=SOURCE ...] [--texts N] [--checkpoints DIR]

SOURCE: a run directory, checkpoint step, converted folder or Hugging Face folder.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import numpy as np

from moe.bench.decode import _ours
from moe.data import tokenizer as tokenizer_lib
from moe.infer import perplexity
from moe.infer import source as source_lib
from moe.infer.commands import _eval_texts
from moe.model.params import count_params
from moe.model.qarray import FORMATS
from moe.quant.store import quantize_checkpoint

NEW_TOKENS = 32
PROMPTS = 4


def _nbytes(params) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(params))


def _decode(src, prompt_ids) -> dict:
    """Batch-1 greedy decode of each prompt: tokens/s (median) and the tokens."""
    speeds, tokens = [], []
    for ids in prompt_ids:
        out = _ours(src.model, src.params, [ids], NEW_TOKENS)
        speeds.append((NEW_TOKENS - 1) / max(out["total_s"] - out["prefill_s"], 1e-9))
        tokens.append([int(t) for t in out["tokens"][0]])
    return {"decode_tokens_per_s": float(np.median(speeds)), "tokens": tokens}


def _agreement(tokens, reference) -> float:
    """Mean number of leading greedy tokens equal to the reference's, per prompt."""
    counts = []
    for ours, ref in zip(tokens, reference):
        n = 0
        while n < min(len(ours), len(ref)) and ours[n] == ref[n]:
            n += 1
        counts.append(n)
    return float(np.mean(counts))


def measure(name: str, source: str, checkpoints: Path, n_texts: int) -> list[dict]:
    rows, variants = [], [("float32", source, "float32"), ("bfloat16", source, "bfloat16")]
    for fmt in FORMATS:
        target = checkpoints / f"{name}-{fmt}"
        if not target.is_dir():
            quantize_checkpoint(source, str(target), fmt)
        variants.append((fmt, str(target), "float32"))
    reference_src = source_lib.load(source, "float32")
    sp = tokenizer_lib.load(reference_src.tokenizer)
    texts = _eval_texts(reference_src, [])[:n_texts]
    ids = [sp.encode(t)[:64] for t in texts if len(sp.encode(t)) >= 64][:PROMPTS]
    prompts = [[sp.bos_id(), *x] for x in ids]
    n_params = count_params(reference_src.model).total
    context = min(reference_src.model.max_seq_len, 512)
    reference_tokens = None
    for label, path, dtype in variants:
        src = source_lib.load(path, dtype, reference_src.tokenizer)
        start = time.perf_counter()
        ppl = perplexity.evaluate(src.model, src.params, texts, sp, context=context, stride=context // 2)
        decode = _decode(src, prompts)
        reference_tokens = reference_tokens or decode["tokens"]
        rows.append(
            {
                "model": name,
                "format": label,
                "perplexity": ppl["perplexity"],
                "nll": ppl["nll"],
                "tokens": ppl["tokens"],
                "bytes_per_param": _nbytes(src.params) / n_params,
                "decode_tokens_per_s": decode["decode_tokens_per_s"],
                "greedy_match": _agreement(decode["tokens"], reference_tokens),
                "seconds": time.perf_counter() - start,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    ref = {r["format"]: r["perplexity"] for r in rows}
    for r in rows:
        r["rel_err_vs_float32"] = (r["perplexity"] - ref["float32"]) / ref["float32"]
        r["rel_err_vs_int8"] = (r["perplexity"] - ref["int8"]) / ref["int8"]
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | format | perplexity | vs float32 | vs int8 | bytes / param | decode tokens/s (batch 1) | "
        "greedy tokens = float32's (of 32) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['format']} | {r['perplexity']:.3f} | {r['rel_err_vs_float32']:+.2%} | "
            f"{r['rel_err_vs_int8']:+.2%} | {r['bytes_per_param']:.3f} | {r['decode_tokens_per_s']:.1f} | "
            f"{r['greedy_match']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("models", nargs="+", help="NAME=SOURCE")
    parser.add_argument("--texts", type=int, default=40, help="held-out documents scored (the first N)")
    parser.add_argument("--checkpoints", default="runs/quant/checkpoints", help="where the quantized copies go")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.models:
        name, source = spec.split("=", 1)
        rows += measure(name, source, Path(args.checkpoints), args.texts)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "results.md").write_text(table(rows) + "\n")
    print(table(rows))
    assert all(math.isfinite(r["perplexity"]) for r in rows)


if __name__ == "__main__":
    main()
