"""`moe bench` decode section: prefill and decode tokens/s, ours beside Hugging Face's
`generate` (greedy, the same weights through the converter, the same prompts and number of
new tokens), and whether both produced the same tokens.

Prefill time is a run with one new token; decode tokens/s counts the other new tokens over
the rest of the time. Neither side may stop early: our eos is set to an id the model never
produces, HF gets min_new_tokens.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import jax
import numpy as np

import moe.model as M
from moe.config import ModelConfig
from moe.convert.hf import save_hf
from moe.infer.decode import generate

PROMPT_TOKENS = 64


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _ours(cfg: ModelConfig, params, prompts, new: int) -> dict:
    cfg = dataclasses.replace(cfg, eos_id=cfg.vocab_size)  # never produced: every row runs to the end
    for n in (1, new):  # compile both shapes first
        generate(cfg, params, prompts, n, batch_size=len(prompts))
    prefill_s, _ = _timed(lambda: generate(cfg, params, prompts, 1, batch_size=len(prompts)))
    total_s, out = _timed(lambda: generate(cfg, params, prompts, new, batch_size=len(prompts)))
    return {"prefill_s": prefill_s, "total_s": total_s, "tokens": out}


def _hf(model, prompts, new: int) -> dict:
    import torch  # optional (the test extra): the Hugging Face reference

    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))

    def run(n):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    run(2)  # warm-up
    prefill_s, _ = _timed(lambda: run(1))
    total_s, out = _timed(lambda: run(new))
    return {"prefill_s": prefill_s, "total_s": total_s, "tokens": out[:, ids.shape[1] :].tolist()}


def _rates(r: dict, batch: int, new: int) -> dict:
    decode_s = max(r["total_s"] - r["prefill_s"], 1e-9)
    return {
        "prefill_tokens_per_s": batch * PROMPT_TOKENS / r["prefill_s"],
        "decode_tokens_per_s": batch * (new - 1) / decode_s,
    }


def decode_bench(cfg: ModelConfig, new: int, batches=(1, 8)) -> dict:
    """Ours and HF's generate on random weights of `cfg` (float32), per batch size."""
    import torch  # optional (the test extra): the Hugging Face reference
    from transformers import AutoModelForCausalLM

    cfg = dataclasses.replace(
        cfg, dtype="float32", param_dtype="float32", max_seq_len=max(cfg.max_seq_len, PROMPT_TOKENS + new)
    )
    params = jax.tree_util.tree_map(np.asarray, M.init(cfg, jax.random.key(0)))
    with tempfile.TemporaryDirectory() as folder:
        save_hf(cfg, params, folder, dtype="float32")
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    out = {}
    for batch in batches:
        prompts = rng.integers(3, cfg.vocab_size, (batch, PROMPT_TOKENS)).tolist()
        ours, hf = _ours(cfg, params, prompts, new), _hf(hf_model, prompts, new)
        out[f"batch{batch}"] = {
            "ours": _rates(ours, batch, new),
            "hf": _rates(hf, batch, new),
            "same_tokens": ours["tokens"] == hf["tokens"],
            "new_tokens": new,
        }
        o, h = out[f"batch{batch}"]["ours"], out[f"batch{batch}"]["hf"]
        out[f"batch{batch}"]["decode_ratio_vs_hf"] = o["decode_tokens_per_s"] / h["decode_tokens_per_s"]
    return out


def format_lines(name: str, result: dict) -> list[str]:
    lines = []
    for key, r in result.items():
        o, h = r["ours"], r["hf"]
        lines.append(
            f"decode {name:<10} {key:<7} prefill {o['prefill_tokens_per_s']:8.0f} vs HF "
            f"{h['prefill_tokens_per_s']:8.0f} tokens/s; decode {o['decode_tokens_per_s']:7.1f} vs HF "
            f"{h['decode_tokens_per_s']:7.1f} tokens/s ({r['decode_ratio_vs_hf']:.2f}x); "
            f"same tokens: {r['same_tokens']}"
        )
    return lines
