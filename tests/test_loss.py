"""The fused lm_head + cross-entropy (moe/training/loss.py) against the plain formula: value and
every gradient, in blocks, with zero and fractional weights; the no-gradient path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.training.loss import default_chunk, fused_nll_sum, token_nll


def _inputs(dtype=jnp.float32, batch=2, seq=12, d_model=16, vocab=50):
    keys = jax.random.split(jax.random.key(3), 4)
    hidden = jax.random.normal(keys[0], (batch, seq, d_model), dtype)
    kernel = (jax.random.normal(keys[1], (d_model, vocab)) * 0.5).astype(dtype)
    targets = jax.random.randint(keys[2], (batch, seq), 0, vocab)
    weights = jax.random.uniform(keys[3], (batch, seq))
    weights = weights.at[0, 3:7].set(0.0).at[1, -2:].set(0.0)  # masked positions, and fractional weights elsewhere
    return hidden, kernel, targets, weights


def _plain(hidden, kernel, targets, weights):
    logits = (hidden @ kernel).astype(jnp.float32)
    return jnp.sum(token_nll(logits, targets) * weights)


@pytest.mark.parametrize("chunk", [1, 3, 4, 12])
def test_fused_loss_equals_the_plain_one_in_value_and_gradients(chunk):
    hidden, kernel, targets, weights = _inputs()
    args = (0, 1, 3)
    plain, plain_grads = jax.value_and_grad(_plain, args)(hidden, kernel, targets, weights)
    fused, fused_grads = jax.value_and_grad(lambda h, k, t, w: fused_nll_sum(h, k, t, w, chunk), args)(
        hidden, kernel, targets, weights
    )
    assert abs(float(fused - plain)) <= 1e-5 * abs(float(plain))
    for name, a, b in zip(["hidden", "kernel", "weights"], plain_grads, fused_grads):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5, name
    # masked positions get no gradient at all
    assert not np.asarray(fused_grads[0])[0, 3:7].any()


def test_fused_loss_scales_by_the_cotangent_and_composes_under_jit():
    hidden, kernel, targets, weights = _inputs()
    plain = jax.grad(lambda h, k: 2.5 * _plain(h, k, targets, weights) ** 2, (0, 1))(hidden, kernel)
    fused = jax.jit(jax.grad(lambda h, k: 2.5 * fused_nll_sum(h, k, targets, weights, 4) ** 2, (0, 1)))(hidden, kernel)
    for a, b in zip(plain, fused):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-4)


def test_fused_loss_without_gradient_is_the_plain_value():
    hidden, kernel, targets, weights = _inputs()
    value = jax.jit(lambda *a: fused_nll_sum(*a, 6))(hidden, kernel, targets, weights)
    assert abs(float(value - _plain(hidden, kernel, targets, weights))) <= 1e-5 * float(value)


def test_fused_loss_in_bfloat16_matches_the_plain_bfloat16_loss():
    # the logits are a bfloat16 matmul cast to float32 (as LMHead computes them); the kernel
    # gradient is accumulated in float32 over blocks, so it may differ in bfloat16's last bit
    hidden, kernel, targets, weights = _inputs(jnp.bfloat16)
    plain, (gh, gk) = jax.value_and_grad(_plain, (0, 1))(hidden, kernel, targets, weights)
    fused, (fh, fk) = jax.value_and_grad(lambda h, k: fused_nll_sum(h, k, targets, weights, 4), (0, 1))(hidden, kernel)
    assert fh.dtype == jnp.bfloat16 and fk.dtype == jnp.bfloat16
    assert abs(float(fused - plain)) <= 1e-5 * abs(float(plain))
    for a, b in [(gh, fh), (gk, fk)]:
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 2**-7 * np.abs(a).max()


def test_default_chunk_is_the_largest_divisor_up_to_128():
    assert default_chunk(512) == 128 and default_chunk(16) == 16 and default_chunk(384) == 128
    assert default_chunk(100) == 100 and default_chunk(250) == 125 and default_chunk(131) == 1
