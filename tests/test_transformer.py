import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe.model as M
from moe import config as C
from moe.model.params import count_params

from helpers import CONFIGS, tiny_model

PUBLISHED = {  # (total, active per token), from the published configurations
    "mistral-7b": (7_241_732_096, 7_241_732_096),
    "mixtral-8x7b": (46_702_792_704, 12_879_925_248),
    "mixtral-8x22b": (140_630_071_296, 39_161_468_928),
    "qwen3-30b-a3b": (30_532_122_624, 3_353_032_704),  # published as 30.5B and 3.3B
}


def formula_count(m):
    """Parameter count from the architecture's formula, independent of the module code."""
    hd = m.resolved_head_dim
    attn = m.d_model * hd * (2 * m.n_heads + 2 * m.n_kv_heads) + (2 * hd if m.qk_norm else 0)
    ffn = 3 * m.d_model * m.d_ff
    shared = 3 * m.d_model * (m.d_ff_shared or m.d_ff) * m.n_shared_experts
    per_layer_total = attn + 2 * m.d_model + shared
    per_layer_total += m.n_experts * ffn + m.d_model * m.n_experts if m.is_moe else ffn
    per_layer_active = per_layer_total - ((m.n_experts - m.top_k) * ffn if m.is_moe else 0)
    outer = 2 * m.vocab_size * m.d_model + m.d_model
    return outer + m.n_layers * per_layer_total, outer + m.n_layers * per_layer_active


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_parameter_counts_of_every_preset(path):
    cfg = C.load(path).model
    count = count_params(cfg)
    assert (count.total, count.active) == formula_count(cfg)
    if path.stem in PUBLISHED:
        assert (count.total, count.active) == PUBLISHED[path.stem]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_eval_shape_on_every_shipped_config(path):
    cfg = C.load(path).model
    shapes = M.param_shapes(cfg)
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    logits, stats = jax.eval_shape(lambda p, t: M.apply(cfg, p, t), shapes, tokens)
    assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
    if cfg.is_moe:
        assert stats["expert_counts"].shape == (cfg.n_layers, cfg.n_experts)
    axes = M.logical_axes(cfg)
    for spec, leaf in zip(
        jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
        jax.tree_util.tree_leaves(shapes),
    ):
        assert len(spec) == len(leaf.shape) and all(name is not None for name in spec)


def _loss_and_grads(cfg, params, tokens):
    def loss(p):
        return jnp.mean(jax.nn.log_softmax(M.logits(cfg, p, tokens))[..., 0])

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_changes_nothing_numerically(remat):
    cfg = tiny_model()
    params = M.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    v0, g0 = _loss_and_grads(cfg, params, tokens)
    v1, g1 = _loss_and_grads(dataclasses.replace(cfg, remat=remat), params, tokens)
    assert abs(float(v0 - v1)) < 1e-6
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def _dots(jaxpr):
    """Every dot_general in a jaxpr and the jaxprs inside it (scan, loops, custom VJPs)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "ragged_dot", "ragged_dot_general"):
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    yield from _dots(inner)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = tiny_model(dtype="bfloat16")
    params = M.init(cfg, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    lg_bf16 = M.logits(cfg, params, tokens)
    lg_f32 = M.logits(dataclasses.replace(cfg, dtype="float32"), params, tokens)
    assert lg_bf16.dtype == jnp.float32
    # bfloat16 compute is really used: the logits move by more than float32 rounding could
    # (bfloat16 keeps 8 bits), yet stay close
    diff, scale = float(np.abs(np.asarray(lg_bf16 - lg_f32)).max()), float(np.abs(np.asarray(lg_f32)).max())
    assert 2.0**-10 * scale < diff < 0.1, (diff, scale)
    # every matmul takes bfloat16 operands, except the router's logits and its statistics
    # (float32 by design; each gives [..., experts])
    dots = list(_dots(jax.make_jaxpr(lambda p: M.logits(cfg, p, tokens))(params).jaxpr))
    float32 = [eqn for eqn in dots if any(v.aval.dtype != jnp.bfloat16 for v in eqn.invars[:2])]
    assert len(dots) - len(float32) >= 10
    assert all(eqn.outvars[0].aval.shape[-1] == cfg.n_experts for eqn in float32), float32
    assert [eqn.invars[1].aval.shape for eqn in float32].count((cfg.d_model, cfg.n_experts)) == 1  # the gate


def test_layers_get_distinct_initial_weights():
    params = M.init(tiny_model(), jax.random.key(0))
    w1 = np.asarray(params["layers"]["moe"]["w1"])
    assert not np.allclose(w1[0], w1[1]) and not np.allclose(w1[0, 0], w1[0, 1])
