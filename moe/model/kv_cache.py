"""The decoding KV cache: a pytree of preallocated arrays, one entry per layer, as a ring.

    k, v  [layers, batch, slots, kv_heads, head_dim]  keys (after RoPE) and values
    pos   [batch, slots] int32   absolute position held by each slot; -1: empty
    end   [batch] int32          next position of each row (its length so far)

Position p lives in slot p mod slots. Under a sliding window of W keys a cache of W slots is
enough for any length (the key p overwrites is p - W, which no later query sees); without a
window the cache needs a slot for every position of the sequence. Attention masks by the
stored positions (moe/model/attention.py), so rows of different lengths share one cache and
the result equals full attention over the W-key window. `pos` is the same for every layer
(every layer writes the same positions), so it is stored once.
"""

from __future__ import annotations

import jax.numpy as jnp

from moe.config import ModelConfig
from moe.model.layers import DTYPES


def slots_needed(cfg: ModelConfig, max_len: int) -> int:
    """Slots for sequences of up to max_len positions: W under a sliding window, else max_len."""
    if cfg.sliding_window is not None:
        return min(cfg.sliding_window, max_len)
    return max_len


def init(cfg: ModelConfig, batch: int, slots: int, dtype=None) -> dict:
    dtype = dtype or DTYPES[cfg.dtype]
    shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.resolved_head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "pos": jnp.full((batch, slots), -1, jnp.int32),
        "end": jnp.zeros((batch,), jnp.int32),
    }


def plan_write(cache: dict, q_pos, sliding_window: int | None):
    """Where new tokens at positions q_pos [batch, seq] (-1: padding) go, and what they attend.

    Returns (attn, new_pos, new_end, append): attn for the layers (q_pos, k_pos and "slot",
    each token's slot or `slots` for tokens not written: padding, and tokens a later token of
    the same chunk overwrites); append is static: True when the chunk must see the cache as it
    was (a windowed ring and more than one new token), False to write first.
    """
    batch, slots = cache["pos"].shape
    last = jnp.max(q_pos, axis=1, keepdims=True)  # [batch, 1] the row's newest position
    kept = (q_pos >= 0) & (q_pos > last - slots)  # the last `slots` tokens of each row
    slot = jnp.where(kept, q_pos % slots, slots)  # [batch, seq]
    rows = jnp.arange(batch)[:, None]
    new_pos = cache["pos"].at[rows, slot].set(q_pos, mode="drop")
    append = sliding_window is not None and q_pos.shape[1] > 1
    k_pos = jnp.concatenate([cache["pos"], q_pos], axis=1) if append else new_pos
    new_end = jnp.maximum(cache["end"], last[:, 0] + 1)
    return {"q_pos": q_pos, "k_pos": k_pos, "slot": slot}, new_pos, new_end, append


def as_layer_list(cache: dict) -> dict:
    """The cache with k and v as per-layer sequences (Transformer(layer_list=True)), so each
    layer reads and updates its own buffer."""
    return {**cache, "k": tuple(cache["k"]), "v": tuple(cache["v"])}
