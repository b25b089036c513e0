"""Grouped-query attention with causal, sliding-window and document (segment) masks."""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from moe.config import ModelConfig
from moe.model.layers import DTYPES, apply_rope, kernel_init, param_with_axes


def attention_mask(seq_len: int, sliding_window: int | None, segment_ids=None):
    """Boolean [batch or 1, 1, 1, seq, seq]: query i may attend to key j.

    Causal: j <= i. Sliding window W: i - W < j, so exactly W keys, i itself included.
    Segments: only keys of the same document (packed sequences never attend across).
    """
    i = jnp.arange(seq_len)[:, None]
    j = jnp.arange(seq_len)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed = allowed & (j > i - sliding_window)
    allowed = allowed[None, None, None]  # [1, 1, 1, q, k]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [batch, q, k]
        allowed = allowed & same[:, None, None]
    return allowed


def dot_product_attention(q, k, v, mask):
    """q: [batch, seq, kv_heads, group, head_dim]; k, v: [batch, seq, kv_heads, head_dim].

    Query head h = kv * group + g uses kv head kv (h // group). Softmax in float32.
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = nn.softmax(scores, axis=-1).astype(v.dtype)  # [batch, kv, group, q, s]
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask):  # x: [batch, seq, d_model]
        cfg, dtype = self.cfg, DTYPES[self.cfg.dtype]
        pdt, init = DTYPES[cfg.param_dtype], kernel_init(cfg)
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        wq = param_with_axes(self, "q", init, (d, h, hd), ("embed", "heads", "head_dim"), pdt)
        wk = param_with_axes(self, "k", init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt)
        wv = param_with_axes(self, "v", init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt)
        wo = param_with_axes(self, "o", init, (h, hd, d), ("heads", "head_dim", "embed"), pdt)
        x = x.astype(dtype)
        q = jnp.einsum("bsd,dhk->bshk", x, wq.astype(dtype))  # [batch, seq, heads, head_dim]
        k = jnp.einsum("bsd,dhk->bshk", x, wk.astype(dtype))  # [batch, seq, kv_heads, head_dim]
        v = jnp.einsum("bsd,dhk->bshk", x, wv.astype(dtype))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        batch, seq = x.shape[:2]
        q = q.reshape(batch, seq, kv, h // kv, hd)  # [batch, seq, kv_heads, group, head_dim]
        out = dot_product_attention(q, k, v, mask).reshape(batch, seq, h, hd)
        return jnp.einsum("bshk,hkd->bsd", out, wo.astype(dtype))
