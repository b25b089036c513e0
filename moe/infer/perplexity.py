"""Perplexity and bits per byte over text, with windowed evaluation for long texts.

Each text is tokenized as [bos] + pieces; every piece is predicted exactly once. A text
longer than the context is cut into windows of `context` tokens starting every `stride`
tokens; each window scores only the tokens no earlier window scored, so a token is
predicted from at least context - stride tokens of history (all of it when the text fits).
Token-weighted: NLL summed over every scored token of every text, then divided.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import moe.model as M
from moe import progress
from moe.config import ModelConfig
from moe.infer.decode import bucket
from moe.training.loss import default_chunk, fused_nll_sum


@dataclasses.dataclass(frozen=True)
class Window:
    ids: list[int]  # the window's tokens (inputs and targets)
    score_from: int  # targets ids[score_from + 1:] are scored (positions score_from.. predict them)


def windows(ids: list[int], context: int, stride: int) -> list[Window]:
    """Windows covering ids so that each of ids[1:] is a scored target exactly once."""
    if len(ids) <= context:
        return [Window(ids, 0)]
    out, scored_to = [], 1  # ids[:scored_to] are done (the bos is never a target)
    begin = 0
    while scored_to < len(ids):
        end = min(begin + context, len(ids))
        out.append(Window(ids[begin:end], scored_to - 1 - begin))
        scored_to = end
        # the next window holds at least the token before its first target (a window's
        # first token is only an input): with stride = context, windows overlap by one
        begin = min(begin + stride, scored_to - 1, len(ids) - context)
    return out


@functools.partial(jax.jit, static_argnums=0)
def _nll(cfg: ModelConfig, params, tokens_bs, weight_bs):
    """(summed NLL, scored count) of targets tokens[:, 1:] under weights (1: scored, 0: not).
    The lm_head and log-softmax run over blocks of positions, as the training loss does, so
    the [batch, seq, vocab] float32 logits never exist whole: at Mistral's 32000-token
    vocabulary they would dwarf a small model's own activations."""
    hidden, _ = M.apply(cfg, params, tokens_bs[:, :-1], head=False)
    weights = weight_bs[:, 1:]
    chunk = default_chunk(hidden.shape[1])
    return fused_nll_sum(hidden, M.lm_head_kernel(cfg, params), tokens_bs[:, 1:], weights, chunk), jnp.sum(weights)


def evaluate(cfg: ModelConfig, params, texts: list[str], sp, *, context: int, stride: int, batch_size: int = 8) -> dict:
    """{"tokens", "bytes", "nll", "perplexity", "bits_per_byte", "texts"} over the texts."""
    all_windows = []
    for text in texts:
        all_windows += windows([sp.bos_id(), *sp.encode(text)], context, stride)
    all_windows.sort(key=lambda w: len(w.ids))  # similar lengths share a padded shape
    sums = []  # read back after the loop, so batches are dispatched without waiting
    for first in progress.bar(range(0, len(all_windows), batch_size), desc="perplexity", unit="batch"):
        group = all_windows[first : first + batch_size]
        length = min(bucket(max(len(w.ids) for w in group)), context)
        tokens = np.zeros((batch_size, length + 1), np.int32)  # +1: the inputs are tokens[:, :-1]
        weight = np.zeros((batch_size, length + 1), np.float32)
        for r, w in enumerate(group):
            tokens[r, : len(w.ids)] = w.ids
            weight[r, w.score_from + 1 : len(w.ids)] = 1.0
        sums.append(_nll(cfg, params, jnp.asarray(tokens), jnp.asarray(weight)))
        if len(sums) > 1:  # one batch in flight while the next is built; the bar counts finished ones
            jax.block_until_ready(sums[-2])
    total_nll = float(sum(np.float64(nll) for nll, _ in sums))
    total_tokens = int(sum(int(count) for _, count in sums))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    mean = total_nll / max(total_tokens, 1)
    return {
        "texts": len(texts),
        "tokens": total_tokens,
        "bytes": n_bytes,
        "nll": mean,
        "perplexity": math.exp(mean),
        "bits_per_byte": total_nll / math.log(2) / max(n_bytes, 1),
        "context": context,
        "stride": stride,
    }


def format_table(result: dict) -> str:
    rows = [
        ("texts", f"{result['texts']}"),
        ("tokens scored", f"{result['tokens']}"),
        ("bytes", f"{result['bytes']}"),
        ("NLL / token (nats)", f"{result['nll']:.4f}"),
        ("perplexity", f"{result['perplexity']:.3f}"),
        ("bits per byte", f"{result['bits_per_byte']:.4f}"),
        ("context / stride", f"{result['context']} / {result['stride']}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
