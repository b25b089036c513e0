"""Generation: prefill a batch of prompts into a KV cache, then decode inside one jitted loop.

    new_ids = moe.infer.generate(cfg, params, [[1, 851, 349], [1, 22557]], max_new_tokens=32)

The prompts (right-padded to a bucket length, a power of two, so a new length rarely
recompiles) are prefilled in chunks of PREFILL_CHUNK tokens inside one jitted call: the
cache takes each chunk in turn, so a 32k-token prompt never builds [seq, seq] scores or
[seq, vocab] logits. Then a lax.while_loop decodes one token per step for every row,
until every row has produced eos or max_new_tokens are out. Each row has its own
positions, so prompts of different lengths give the tokens each gives alone. The model is
the training model (moe/model/transformer.py) called with a cache (moe/model/kv_cache.py);
on CPU the decode loop reads the same weights through moe/infer/layout.py's layout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe.config import ModelConfig
from moe.infer.layout import decode_layout
from moe.infer.sampling import Sampling, sample
from moe.model import kv_cache
from moe.model.layers import DTYPES
from moe.model.transformer import LMHead, Transformer

PREFILL_CHUNK = 512  # prompt tokens per prefill step
MIN_BUCKET = 16


class GenerationError(ValueError):
    """A request that cannot be generated; the message says what is wrong and the fix."""


def bucket(n: int) -> int:
    """The padded prompt length for n tokens: a power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def _prefill(cfg: ModelConfig, params, tokens_bp, lengths_b, cache, chunk: int, layer_list: bool):
    """Run the padded prompts through the model chunk by chunk; the logits [batch, vocab] at
    each row's last prompt token (the LM head runs on those rows only), and the filled cache."""
    batch, padded = tokens_bp.shape
    index = jnp.arange(padded)[None]
    positions_bp = jnp.where(index < lengths_b[:, None], index, -1)
    model = Transformer(cfg, head=False, layer_list=layer_list)

    def step(carry, i):
        cache, last = carry
        toks = jax.lax.dynamic_slice_in_dim(tokens_bp, i * chunk, chunk, axis=1)
        pos = jax.lax.dynamic_slice_in_dim(positions_bp, i * chunk, chunk, axis=1)
        hidden, _, cache = model.apply({"params": params}, toks, pos, cache=cache)
        at = lengths_b - 1 - i * chunk  # the row's last prompt token, if in this chunk
        picked = jnp.take_along_axis(hidden, jnp.clip(at, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
        inside = (at >= 0) & (at < chunk)
        return (cache, jnp.where(inside[:, None], picked, last)), None

    last = jnp.zeros((batch, cfg.d_model), DTYPES[cfg.dtype])
    (cache, last), _ = jax.lax.scan(step, (cache, last), jnp.arange(padded // chunk))
    logits = LMHead(cfg).apply({"params": params["lm_head"]}, last[:, None])[:, 0]  # [batch, vocab]
    return logits, cache


@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "slots", "max_new", "sampling", "stream"))
def _generate(cfg, params, layouts, tokens_bp, lengths_b, keys_b, *, chunk, slots, max_new, sampling, stream=None):
    """layouts: (prefill, decode) decode_layout params for Transformer(layer_list=True), or
    None: both take the stacked params."""
    batch = tokens_bp.shape[0]
    cache = kv_cache.init(cfg, batch, slots)
    model, decode_params = Transformer(cfg), params
    if layouts is not None:
        model, decode_params, cache = Transformer(cfg, layer_list=True), layouts[1], kv_cache.as_layer_list(cache)
    logits, cache = _prefill(
        cfg, params if layouts is None else layouts[0], tokens_bp, lengths_b, cache, chunk, layouts is not None
    )

    def choose(logits, step):
        return sample(logits, sampling, jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_b))

    def emit(step, tok):
        if stream is not None:
            jax.experimental.io_callback(stream, None, step, tok, ordered=True)

    first = choose(logits, 0)
    emit(0, first)
    out = jnp.full((batch, max_new), -1, jnp.int32).at[:, 0].set(first)
    finished = first == cfg.eos_id

    def cond(carry):
        step, _, _, finished, _ = carry
        return (step < max_new) & ~jnp.all(finished)

    def body(carry):
        step, tok, out, finished, cache = carry
        pos = cache["end"][:, None]  # the next position of each row
        logits, _, cache = model.apply({"params": decode_params}, tok[:, None], pos, cache=cache)
        nxt = choose(logits[:, 0], step)
        nxt = jnp.where(finished, -1, nxt)
        emit(step, nxt)
        return step + 1, nxt, out.at[:, step].set(nxt), finished | (nxt == cfg.eos_id), cache

    _, _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), first, out, finished, cache))
    return out


def _check(cfg: ModelConfig, prompts, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise GenerationError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        raise GenerationError("no prompts given; pass at least one list of token ids")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty; give at least one token (e.g. bos)")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise GenerationError(
                f"prompt {i} holds token ids outside [0, {cfg.vocab_size}): the tokenizer "
                "does not match the model; use the model's own tokenizer"
            )
    longest = max(len(p) for p in prompts)
    if cfg.sliding_window is None and longest + max_new_tokens > cfg.max_seq_len:
        raise GenerationError(
            f"a prompt of {longest} tokens plus {max_new_tokens} new ones exceeds model.max_seq_len "
            f"({cfg.max_seq_len}) of a model without a sliding window; shorten the prompt or ask for "
            f"at most {max(cfg.max_seq_len - longest, 0)} new tokens"
        )


def _until_eos(row: np.ndarray, eos: int) -> list[int]:
    out = []
    for t in row.tolist():
        if t < 0:
            break
        out.append(t)
        if t == eos:
            break
    return out


def generate(
    cfg: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    stream: Callable | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt (eos included when produced, nothing after it).

    Prompts run in batches of batch_size (default: all at once, at most 8). Row i samples
    with its own key (seed, i), so a prompt's samples do not depend on its batch mates.
    stream(step, tokens [batch]) is called from inside the decode loop as tokens appear
    (-1 for a finished row); only with a single batch.
    """
    prompts = [list(map(int, p)) for p in prompts]
    _check(cfg, prompts, max_new_tokens)
    sampling = Sampling(temperature, top_k, top_p)
    batch_size = batch_size or min(len(prompts), 8)
    if stream is not None and len(prompts) > batch_size:
        raise GenerationError("streaming needs every prompt in one batch; raise batch_size")
    padded = bucket(max(len(p) for p in prompts))
    chunk = min(padded, PREFILL_CHUNK)
    slots = kv_cache.slots_needed(cfg, padded + max_new_tokens)
    layout = decode_layout(cfg, params, batch_size)
    layouts = None if layout is None else (decode_layout(cfg, params, None), layout)
    results = []
    for first in range(0, len(prompts), batch_size):
        group = prompts[first : first + batch_size]
        rows = group + [[cfg.bos_id]] * (batch_size - len(group))  # a full batch: one compiled shape
        tokens = np.zeros((batch_size, padded), np.int32)
        for r, p in enumerate(rows):
            tokens[r, : len(p)] = p
        lengths = np.asarray([len(p) for p in rows], np.int32)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(first, first + batch_size))
        out = _generate(
            cfg,
            params,
            layouts,
            jnp.asarray(tokens),
            jnp.asarray(lengths),
            keys,
            chunk=chunk,
            slots=slots,
            max_new=max_new_tokens,
            sampling=sampling,
            stream=stream,
        )
        out = np.asarray(out)
        results += [_until_eos(out[r], cfg.eos_id) for r in range(len(group))]
    return results
