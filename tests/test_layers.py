import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.model.layers import RMSNorm, SwiGLU, apply_rope, gated, rope_cos_sin

from helpers import hidden_residuals, tiny_model


def test_rmsnorm_matches_formula():
    cfg = tiny_model(rms_norm_eps=1e-5)
    x = np.random.default_rng(0).normal(size=(2, 3, cfg.d_model)).astype(np.float32)
    scale = np.random.default_rng(1).normal(size=(cfg.d_model,)).astype(np.float32)
    y = RMSNorm(cfg).apply({"params": {"scale": scale}}, x)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=1e-5)


def test_rmsnorm_runs_in_float32_for_bfloat16_inputs():
    # Float32 inside gives each output within half a bfloat16 step of the exact value (one
    # rounding at the end); squaring, averaging and rsqrt in bfloat16 round four times and
    # miss by up to two steps. Values spread over [1, 2) so every square rounds in bfloat16.
    cfg = tiny_model(d_model=256, rms_norm_eps=1e-5)
    x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, size=(4, 8, cfg.d_model)), jnp.bfloat16)
    y = RMSNorm(cfg).apply({"params": {"scale": jnp.ones(cfg.d_model)}}, x)
    assert y.dtype == jnp.bfloat16
    x64 = np.asarray(x, np.float64)
    exact = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5)
    half_step = np.exp2(np.floor(np.log2(np.abs(exact))) - 8)  # half a bfloat16 ulp at each value
    assert np.all(np.abs(np.asarray(y, np.float64) - exact) <= half_step * 1.001)


def rope_reference(x, positions, theta):
    """Rotate pair (x[i], x[i + d/2]) by angle p * theta^(-2i/d), in float64."""
    d = x.shape[-1]
    out = np.array(x, np.float64)
    for b in range(x.shape[0]):
        for s in range(x.shape[1]):
            for i in range(d // 2):
                a = positions[b, s] * theta ** (-2.0 * i / d)
                x1, x2 = x[b, s, :, i], x[b, s, :, i + d // 2]
                out[b, s, :, i] = x1 * np.cos(a) - x2 * np.sin(a)
                out[b, s, :, i + d // 2] = x2 * np.cos(a) + x1 * np.sin(a)
    return out


def test_rope_matches_half_layout_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 0, 1, 30]])
    cos, sin = rope_cos_sin(jnp.asarray(positions), 8, 10000.0)
    np.testing.assert_allclose(np.asarray(apply_rope(x, cos, sin)), rope_reference(x, positions, 1e4), atol=1e-5)


def test_rope_gradient_is_the_inverse_rotation():
    """apply_rope's own backward: the gradient of sum(w * rope(x)) is w rotated back, by
    the negated angles (a rotation's transpose); cos and sin get none."""
    rng = np.random.default_rng(1)
    x, w = (rng.normal(size=(2, 5, 3, 8)).astype(np.float32) for _ in range(2))
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 0, 1, 30]])
    cos, sin = rope_cos_sin(jnp.asarray(positions), 8, 10000.0)
    dx, dcos = jax.grad(lambda x, c: jnp.sum(w * apply_rope(x, c, sin)), argnums=(0, 1))(jnp.asarray(x), cos)
    np.testing.assert_allclose(np.asarray(dx), rope_reference(w, -positions, 1e4), atol=1e-5)
    assert not np.any(np.asarray(dcos))


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, 1, 1, 1, 16)).astype(np.float32)

    def score(pq, pk):
        cq, sq = rope_cos_sin(jnp.array([[pq]]), 16, 1e6)
        ck, sk = rope_cos_sin(jnp.array([[pk]]), 16, 1e6)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert abs(score(5, 2) - score(105, 102)) < 1e-4
    assert abs(score(5, 2) - score(5, 3)) > 1e-4


def test_swiglu_matches_formula():
    cfg = tiny_model()
    params = SwiGLU(cfg).init(jax.random.key(0), jnp.zeros((1, 1, cfg.d_model)))["params"]
    params = jax.tree_util.tree_map(
        lambda p: p.unbox() if hasattr(p, "unbox") else p, params, is_leaf=lambda p: hasattr(p, "unbox")
    )
    x = np.random.default_rng(0).normal(size=(2, 3, cfg.d_model)).astype(np.float32)
    w1, w3, w2 = (np.asarray(params[n], np.float64) for n in ("w1", "w3", "w2"))
    g = x @ w1
    expected = (g / (1 + np.exp(-g)) * (x @ w3)) @ w2
    np.testing.assert_allclose(np.asarray(SwiGLU(cfg).apply({"params": params}, x)), expected, atol=1e-5)


@pytest.mark.parametrize("remat,kept", [("none", 2), ("full", 3)])
def test_swiglu_recomputes_its_gated_product_only_where_the_layer_is_not_rematerialized(remat, kept):
    """The dense MLP's backward keeps x w1 and x w3; silu(x w1) * (x w3) only where the
    layer is rematerialized (model.remat), which saves nothing of it anyway."""
    cfg = tiny_model(n_experts=0, remat=remat)
    x = jax.random.normal(jax.random.key(1), (2, 5, cfg.d_model))
    params = SwiGLU(cfg).init(jax.random.key(0), x)["params"]
    _, vjp_fn = jax.vjp(lambda p, x: SwiGLU(cfg).apply({"params": p}, x), params, x)  # w2's gradient needs h
    assert len(hidden_residuals(vjp_fn, cfg.d_model, cfg.d_ff)) == kept


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gated_product_and_its_gradient_equal_jaxs_own_bit_for_bit(dtype):
    """gated keeps only its two inputs for the backward; value and both gradients are those
    of autodiff through silu(gate) * up, to the bit, compiled as the model always is (run op
    by op, XLA fuses JAX's own derivative differently and the last bits differ)."""
    keys = jax.random.split(jax.random.key(0), 3)
    gate, up, g = (jax.random.normal(k, (64, 40), dtype) * 3 for k in keys)
    plain = lambda a, b: nn.silu(a) * b

    def value_and_grads(f):
        return jax.jit(lambda a, b, g: (lambda v, vjp: (v, *vjp(g)))(*jax.vjp(f, a, b)))(gate, up, g)

    for a, b in zip(value_and_grads(gated), value_and_grads(plain)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
