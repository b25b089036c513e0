import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe.model as M
from moe.model.attention import (
    Attention,
    attention_mask,
    causal_self_attention,
    dot_product_attention,
    fused_attention,
    resolve,
    row_windows,
)
from moe.model.layers import rope_cos_sin

from helpers import tiny_model


def _index_mask(seq):
    index = jnp.arange(seq)[None]
    return {"q_pos": index, "k_pos": index}


def _attn_inputs(cfg, batch=2, seq=12, seed=0):
    x = jax.random.normal(jax.random.key(seed), (batch, seq, cfg.d_model))
    cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(seq), (batch, seq)), cfg.resolved_head_dim, cfg.rope_theta)
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


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.slow
def test_the_model_in_causal_blocks_equals_one_block(window, monkeypatch):
    """The model's own call of the blocked self-attention (blocks of 4 rows here, 128 by
    default) gives the logits of the plain one-block path; packed documents included."""
    cfg = tiny_model(sliding_window=window)
    params = M.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, cfg.vocab_size)
    seg = jnp.asarray([[1] * 6 + [2] * 7, [1] * 10 + [0] * 3])
    whole = M.apply(cfg, params, tokens, segment_ids=seg)[0]
    monkeypatch.setattr("moe.model.attention.CAUSAL_BLOCK", 4)
    blocked = M.apply(cfg, params, tokens, segment_ids=seg)[0]
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), atol=1e-5, rtol=0)


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


def _reference_attention(q, k, v, q_pos, k_pos, window, q_seg, k_seg):
    """The textbook formula, differentiated by JAX: kv heads repeated per group, masked
    scores, softmax, weighted values."""
    group = q.shape[3]
    k_h, v_h = (jnp.repeat(a, group, axis=2) for a in (k, v))  # [b, s, heads, d]
    q_h = q.reshape(*q.shape[:2], -1, q.shape[-1])  # [b, q, heads, d]
    scores = jnp.einsum("bqhd,bshd->bhqs", q_h, k_h) / np.sqrt(q.shape[-1])
    mask = attention_mask(q_pos, k_pos, window, q_seg, k_seg)[:, 0]  # [b, 1, q, s]
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
    return jnp.einsum("bhqs,bshd->bqhd", probs, v_h).reshape(q.shape)


def _random_qkv(seed, seq):
    """q [2, seq, 2 kv heads, 3 per group, 8], k, v [2, seq, 2, 8] and loss weights like q."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (2, seq, 2, 3, 8))
    k, v = (jax.random.normal(key, (2, seq, 2, 8)) for key in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], q.shape)


def _two_documents_and_padding(seq):
    """Segment ids [2, seq]: row 0 two documents (8 tokens, then the rest), row 1 one
    document ending in 4 padding tokens (segment 0)."""
    return jnp.asarray([[1] * 8 + [2] * (seq - 8), [1] * (seq - 4) + [0] * 4])


def _value_and_grads(fn, weights, q, k, v):
    return jax.value_and_grad(lambda *a: jnp.sum(weights * fn(*a)), argnums=(0, 1, 2))(q, k, v)


def _assert_same_value_and_grads(reference, fn, weights, q, k, v):
    """sum(weights * attention) and its dq, dk, dv from fn within 1e-5 of the reference's."""
    expected, actual = (jax.tree.leaves(_value_and_grads(f, weights, q, k, v)) for f in (reference, fn))
    for name, a, b_ in zip(["value", "dq", "dk", "dv"], expected, actual):
        np.testing.assert_allclose(np.asarray(b_), np.asarray(a), atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("window,segments,chunk", [(None, False, 64), (5, True, 64), (5, True, 4), (None, True, 4)])
def test_attention_equals_the_textbook_formula_in_value_and_gradient(window, segments, chunk):
    """The attention's own backward (flash-style softmax gradient) against JAX's gradient of
    the plain formula: causal or windowed, packed documents with padding, GQA, query chunks;
    row 1 ends in padding queries and keys (position -1) that attend to nothing."""
    seq = 19
    q, k, v, weights = _random_qkv(5, seq)
    pos = jnp.asarray([list(range(seq)), list(range(15)) + [-1] * 4])
    seg = _two_documents_and_padding(seq) if segments else None
    _assert_same_value_and_grads(
        lambda q, k, v: _reference_attention(q, k, v, pos, pos, window, seg, seg),
        lambda q, k, v: dot_product_attention(q, k, v, pos, pos, window, seg, seg, chunk=chunk),
        weights,
        q,
        k,
        v,
    )


@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize(
    "windows", [((0, 4), (4, 8), (8, 11)), ((0, 4), (2, 8), (6, 11)), ((0, 3), (0, 7), (0, 11)), ((3, 6), (6, 9))]
)
def test_row_windows_equal_slices_in_value_and_gradient(windows, axis):
    """Query blocks (windows that tile the axis: gradients concatenated), windowed and causal
    key ranges (overlapping windows: gradients added into their rows), and windows that
    leave rows out (those rows get zero gradient); along the sequence axis of either layout."""
    x = jnp.moveaxis(jax.random.normal(jax.random.key(3), (2, 11, 3, 2)), 1, axis)
    weights = [
        jnp.moveaxis(jax.random.normal(jax.random.key(4 + i), (2, stop - start, 3, 2)), 1, axis)
        for i, (start, stop) in enumerate(windows)
    ]

    def loss(fn):
        return lambda x: sum(jnp.sum(w * jnp.sin(piece)) for w, piece in zip(weights, fn(x)))

    sliced = lambda x: tuple(jax.lax.slice_in_dim(x, start, stop, axis=axis) for start, stop in windows)
    for got, want in zip(row_windows(x, windows, axis), sliced(x)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_allclose(
        np.asarray(jax.grad(loss(lambda x: row_windows(x, windows, axis)))(x)),
        np.asarray(jax.grad(loss(sliced))(x)),
        atol=1e-6,
        rtol=1e-6,
    )


@pytest.mark.parametrize("window,segments,block", [(None, False, 4), (5, True, 4), (3, False, 2), (None, True, 1)])
@pytest.mark.slow
def test_causal_blocks_equal_the_textbook_formula_in_value_and_gradient(window, segments, block):
    """Training self-attention skips the key blocks a query block cannot see (its future,
    before its window): value and gradient equal the plain formula over all keys; a last
    partial block; packed documents with padding (segment 0); block 1 has over
    MAX_CAUSAL_BLOCKS blocks, so the block grows to 2 rows."""
    seq = 19
    q, k, v, weights = _random_qkv(7, seq)
    index = jnp.arange(seq)[None]
    seg = _two_documents_and_padding(seq) if segments else None
    _assert_same_value_and_grads(
        lambda q, k, v: _reference_attention(q, k, v, index, index, window, seg, seg),
        lambda q, k, v: causal_self_attention(q, k, v, index, window, seg, block=block),
        weights,
        q,
        k,
        v,
    )


@pytest.mark.parametrize("window,segments", [(None, False), (None, True), (5, False), (5, True)])
def test_jax_dot_product_attention_call_equals_ours_in_value_and_gradient(window, segments):
    """The call that picks cuDNN's flash attention on GPU (model.attention=cudnn), through
    jax's XLA lowering of the same call here: causal, W-key windows, documents with padding."""
    seq = 21
    q, k, v, weights = _random_qkv(9, seq)
    index = jnp.arange(seq)[None]
    seg = _two_documents_and_padding(seq) if segments else None
    (value, grads), (fused_value, fused_grads) = [
        _value_and_grads(fn, weights, q, k, v)
        for fn in (
            lambda q, k, v: dot_product_attention(q, k, v, index, index, window, seg, seg),
            lambda q, k, v: fused_attention(q, k, v, window, seg, implementation="xla"),
        )
    ]
    np.testing.assert_allclose(float(fused_value), float(value), rtol=1e-5)
    for a, b_ in zip(grads, fused_grads):
        np.testing.assert_allclose(np.asarray(b_), np.asarray(a), atol=1e-5, rtol=1e-5)


def test_auto_attention_is_splash_on_tpu_cudnn_on_gpu_in_16_bits_else_xla():
    assert resolve("auto", "tpu") == "splash" and resolve("auto", "cpu", "bfloat16") == "xla"
    assert resolve("auto", "gpu", "bfloat16") == "cudnn" and resolve("auto", "gpu", "float32") == "xla"
    assert resolve("xla", "gpu", "bfloat16") == "xla"


def _splash_inputs(batch=2, seq=128, kv=2, group=2, hd=16):
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (batch, seq, kv, group, hd))
    k, v = (jax.random.normal(key, (batch, seq, kv, hd)) for key in keys[1:])
    seg = jnp.asarray([[1] * 50 + [2] * 60 + [0] * (seq - 110), [1] * seq][:batch], jnp.int32)
    return q, k, v, jnp.arange(seq)[None], seg


@pytest.mark.parametrize("window,segments", [(None, False), (None, True), (7, False), (7, True)])
def test_splash_attention_equals_the_reference_in_value_and_gradient(window, segments):
    """jax's Pallas TPU kernel (interpreted here) against this module's attention: causal or
    a W-key window, packed documents, GQA; forward and the kernel's own backward."""
    from moe.model.splash import splash_attention

    q, k, v, index, seg = _splash_inputs()
    seg = seg if segments else None
    ref = lambda q, k, v: dot_product_attention(q, k, v, index, index, window, seg, seg)
    new = lambda q, k, v: splash_attention(q, k, v, window, seg)
    np.testing.assert_allclose(np.asarray(new(q, k, v)), np.asarray(ref(q, k, v)), atol=1e-5, rtol=0)
    grads = [jax.grad(lambda *a, fn=fn: jnp.sum(jnp.cos(fn(*a))), argnums=(0, 1, 2))(q, k, v) for fn in (ref, new)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)


def test_splash_attention_under_a_mesh_splits_batch_and_heads_and_equals_one_device():
    from moe.model.splash import splash_attention

    q, k, v, _, seg = _splash_inputs(batch=4, kv=2)
    seg = jnp.concatenate([seg, seg])
    one = splash_attention(q, k, v, 7, seg)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 1, 2, 2), ("data", "fsdp", "expert", "tensor"))
    with jax.set_mesh(mesh):
        sharded = jax.jit(lambda *a: splash_attention(*a, 7, seg))(q, k, v)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(one), atol=1e-6, rtol=0)


def test_the_model_with_splash_attention_equals_xla_attention_in_loss_and_gradient():
    from moe import config as C
    from moe.training import step as T

    model = tiny_model(n_layers=1, sliding_window=40, attention="xla")
    cfg = C.Config(model=model, train=C.TrainConfig(batch_size=2, seq_len=128))
    params = T.init_state(cfg, jax.random.key(0)).params
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.vocab_size, (2, 129)).astype(np.int32)
    segments = np.asarray([[1] * 70 + [2] * 58, [1] * 128], np.int32)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segments,
        "positions": np.where(segments == 2, np.arange(128) - 70, np.arange(128)).astype(np.int32),
    }
    out = {}
    for impl in ("xla", "splash"):
        c = dataclasses.replace(cfg, model=dataclasses.replace(model, attention=impl))
        out[impl] = jax.jit(lambda p, b, c=c: T.grads_and_metrics(c, p, b)[:2])(params, batch)
    assert abs(float(out["splash"][0]) - float(out["xla"][0])) <= 1e-5
    for a, b in zip(jax.tree_util.tree_leaves(out["splash"][1]), jax.tree_util.tree_leaves(out["xla"][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
