import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe.model as M
from moe.model.attention import Attention, attention_mask, dot_product_attention
from moe.model.layers import rope_cos_sin
from helpers import tiny_model


def _index_mask(seq):
    index = jnp.arange(seq)[None]
    return {"q_pos": index, "k_pos": index}


def _attn_inputs(cfg, batch=2, seq=12, seed=0):
    x = jax.random.normal(jax.random.key(seed), (batch, seq, cfg.d_model))
    cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(seq), (batch, seq)), cfg.resolved_head_dim,
                            cfg.rope_theta)
    return x, cos, sin


@pytest.mark.parametrize("window", [None, 3])
def test_model_is_causal(window):
    cfg = tiny_model(sliding_window=window)
    params = M.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
    t = 6
    perturbed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
    a, b = M.logits(cfg, params, tokens), M.logits(cfg, params, perturbed)
    np.testing.assert_array_equal(np.asarray(a[:, :t]), np.asarray(b[:, :t]))
    assert np.abs(np.asarray(a[:, t:] - b[:, t:])).max(axis=-1).min() > 0


def test_sliding_window_mask_has_exactly_w_keys():
    window, seq = 4, 10
    index = jnp.arange(seq)[None]
    mask = np.asarray(attention_mask(index, index, window))[0, 0, 0]
    for i in range(seq):
        keys = np.flatnonzero(mask[i])
        assert keys.max() == i and len(keys) == min(i + 1, window)
        assert keys.min() == max(0, i - window + 1)


def test_sliding_window_boundary_in_attention_output():
    window = 4
    cfg = tiny_model(sliding_window=window)
    layer = Attention(cfg)
    x, cos, sin = _attn_inputs(cfg, batch=1)
    mask = _index_mask(x.shape[1])
    params = layer.init(jax.random.key(0), x, cos, sin, mask)
    i = 9
    base = layer.apply(params, x, cos, sin, mask)[0, i]
    inside = layer.apply(params, x.at[0, i - window + 1].add(1.0), cos, sin, mask)[0, i]
    outside = layer.apply(params, x.at[0, i - window].add(1.0), cos, sin, mask)[0, i]
    np.testing.assert_array_equal(np.asarray(base), np.asarray(outside))  # key i - W: not seen
    assert np.abs(np.asarray(base - inside)).max() > 1e-4  # key i - W + 1: seen (W keys)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa_cfg = tiny_model(n_heads=4, n_kv_heads=2)
    mha_cfg = dataclasses.replace(gqa_cfg, n_kv_heads=4)
    x, cos, sin = _attn_inputs(gqa_cfg)
    mask = _index_mask(x.shape[1])
    params = Attention(gqa_cfg).init(jax.random.key(0), x, cos, sin, mask)
    p = dict(nn.unbox(params)["params"])
    group = gqa_cfg.n_heads // gqa_cfg.n_kv_heads
    mha = dict(p, k=jnp.repeat(p["k"], group, axis=1), v=jnp.repeat(p["v"], group, axis=1))
    out_gqa = Attention(gqa_cfg).apply({"params": p}, x, cos, sin, mask)
    out_mha = Attention(mha_cfg).apply({"params": mha}, x, cos, sin, mask)
    np.testing.assert_allclose(np.asarray(out_gqa), np.asarray(out_mha), atol=1e-6)


def test_packed_documents_do_not_attend_across_boundaries():
    cfg = tiny_model(n_experts=0)
    params = M.init(cfg, jax.random.key(0))
    doc_a = jax.random.randint(jax.random.key(1), (1, 5), 0, cfg.vocab_size)
    doc_b = jax.random.randint(jax.random.key(2), (1, 7), 0, cfg.vocab_size)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    positions = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    segments = jnp.array([[1] * 5 + [2] * 7])
    packed_logits, _ = M.apply(cfg, params, packed, positions, segments)
    alone_b = M.logits(cfg, params, doc_b)
    alone_a = M.logits(cfg, params, doc_a)
    np.testing.assert_allclose(np.asarray(packed_logits[:, 5:]), np.asarray(alone_b), atol=1e-5)
    np.testing.assert_allclose(np.asarray(packed_logits[:, :5]), np.asarray(alone_a), atol=1e-5)


@pytest.mark.parametrize("window,segments", [(None, False), (5, True)])
def test_query_chunks_equal_one_block(window, segments):
    """Long sequences go in query chunks (never [seq, seq] scores); the padding of the last
    chunk must not leak into the result."""
    b, seq, kv, group, hd = 2, 23, 2, 2, 8
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, seq, kv, group, hd))
    k, v = (jax.random.normal(key, (b, seq, kv, hd)) for key in keys[1:])
    pos = jnp.broadcast_to(jnp.arange(seq), (b, seq))
    seg = jnp.asarray([[1] * 9 + [2] * 14, [1] * 23]) if segments else None
    whole = dot_product_attention(q, k, v, pos, pos, window, seg, seg, chunk=seq)
    chunked = dot_product_attention(q, k, v, pos, pos, window, seg, seg, chunk=4)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=1e-6, rtol=0)
