"""The grouped matmul against a per-group loop, in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.model.gmm import gmm


def loop_reference(x, w, sizes):
    """Row block of group g times w[g], one group at a time; rows after the groups are zero."""
    out, start = [], 0
    for g, size in enumerate(sizes):
        out.append(x[start : start + size] @ w[g])
        start += size
    out.append(jnp.zeros((x.shape[0] - start, w.shape[2]), x.dtype))
    return jnp.concatenate(out)


@pytest.mark.parametrize(
    "sizes, rows, block",
    [
        ([5, 0, 17, 3], 25, 8),  # an empty group, a group of several blocks, unrouted rows at the end
        ([0, 0, 40, 0], 40, 16),  # every row in one group
        ([1, 1, 1, 1], 4, 64),  # blocks larger than all the rows
        ([33, 31, 0, 9], 73, 8),  # remainders in tail blocks of 8
        ([0, 0, 0, 0], 6, 8),  # nothing routed
    ],
)
def test_gmm_matches_the_per_group_loop(sizes, rows, block):
    keys = jax.random.split(jax.random.key(sum(sizes) + block), 3)
    x = jax.random.normal(keys[0], (rows, 12))
    w = jax.random.normal(keys[1], (len(sizes), 12, 20))
    cot = jax.random.normal(keys[2], (rows, 20))
    group_sizes = jnp.asarray(sizes, jnp.int32)
    got = jax.jit(gmm, static_argnums=3)(x, w, group_sizes, block)
    np.testing.assert_allclose(got, loop_reference(x, w, sizes), rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w) * cot)

    want_dx, want_dw = jax.grad(loss(lambda x, w: loop_reference(x, w, sizes)), argnums=(0, 1))(x, w)
    dx, dw = jax.jit(jax.grad(loss(lambda x, w: gmm(x, w, group_sizes, block)), argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)


def test_gmm_keeps_bfloat16_and_sums_weight_gradients_in_float32():
    # 2,000 rows per group in blocks of 8: 250 partial sums of one sign per weight. Summed
    # in float32 and rounded once, dw is within one bfloat16 step (2^-8 relative) of the
    # exact sum; summed in bfloat16, each addition to a total 100x larger loses most of it.
    sizes = [2000, 1000]
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.uniform(keys[0], (sum(sizes), 16)).astype(jnp.bfloat16)
    w = jax.random.normal(keys[1], (2, 16, 8)).astype(jnp.bfloat16)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    y = gmm(x, w, group_sizes, 8)
    assert y.dtype == jnp.bfloat16
    dw = jax.grad(lambda w: jnp.sum(gmm(x, w, group_sizes, 8).astype(jnp.float32)))(w)
    assert dw.dtype == jnp.bfloat16
    x64 = np.asarray(x, np.float64)
    want = np.stack([x64[:2000].sum(0), x64[2000:].sum(0)])[:, :, None] * np.ones((1, 1, 8))  # [2, 16, 8]
    assert np.abs(np.asarray(dw, np.float64) / want - 1).max() <= 2.0**-8


def test_two_grouped_products_on_the_same_rows_copy_no_buffer():
    # The SwiGLU's w1 and w3 products run on the same rows and write same-shaped outputs (and,
    # backward, same-shaped dx and dw): XLA merged their zero-filled carries into one buffer
    # and copied it into each loop; each product now starts from its own zeros.
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (64, 16))
    w1, w3 = jax.random.normal(keys[1], (4, 16, 24)), jax.random.normal(keys[2], (4, 16, 24))
    w2 = jax.random.normal(keys[3], (4, 24, 16))
    sizes = jnp.asarray([10, 20, 0, 30], jnp.int32)

    def loss(x, w1, w3, w2, sizes):  # the sizes an argument, as routing makes them: not constants
        h = jax.nn.silu(gmm(x, w1, sizes, 8)) * gmm(x, w3, sizes, 8)
        return jnp.sum(gmm(h, w2, sizes, 8) ** 2)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, w1, w3, w2, sizes).compile().as_text()
    copies = [
        line
        for line in hlo.splitlines()
        if " copy(" in line
        and "f32[" in line
        and any(f"f32[{shape}]" in line for shape in ("64,24", "64,16", "4,16,24"))
    ]
    assert not copies, copies
