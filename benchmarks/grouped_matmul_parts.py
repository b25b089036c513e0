"""Where the grouped MoE layer's time goes beyond the equal-active dense SwiGLU: each of the
grouped matmul's three products (moe/model/gmm.py: forward, dx, weight gradient) against
one plain product of the same FLOPs, and the weight gradient's row-block products with
and without adding each block's [d_model, d_ff] float32 result into an accumulator.
bench-moe's shapes (4096 token copies, d_model 512, d_ff 1792, 8 experts of uneven
sizes), float32, each compiled with the train step's XLA options and all timed in turns
(medians). Results on the 2-core CPU machine: benchmarks/README.md, "Tried and not kept",
2026-12-07 (c14ebb1).

    python benchmarks/grouped_matmul_parts.py [ROUNDS]
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moe.bench.training import _alternating
from moe.model import gmm
from moe.training import step as train_lib

COPIES, D_MODEL, D_FF, BLOCK = 4096, 512, 1792, 128
GROUP_SIZES = [549, 475, 523, 501, 572, 452, 517, 507]  # 512 +- up to 60, summing to COPIES


def _tn(a, b):  # a.T @ b in float32, as the weight gradient's blocks compute it
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _blocks(x, dy, accumulate: str):
    """The weight gradient's BLOCK-row products over all rows: results dropped but for 8
    rows ("none"), added into one [k, m] accumulator ("local"), or into slice g of an
    [8, k, m] carry, one group per 512 rows ("slices", as gmm does)."""
    k, m = x.shape[1], dy.shape[1]

    def block(b):  # [k, m]
        return _tn(lax.dynamic_slice_in_dim(x, b * BLOCK, BLOCK), lax.dynamic_slice_in_dim(dy, b * BLOCK, BLOCK))

    n_blocks = COPIES // BLOCK
    if accumulate == "none":
        return lax.fori_loop(0, n_blocks, lambda b, acc: acc + block(b)[:8], jnp.zeros((8, m)))
    if accumulate == "local":
        return lax.fori_loop(0, n_blocks, lambda b, acc: acc + block(b), jnp.zeros((k, m)))
    per_group = n_blocks // 8
    return lax.fori_loop(0, n_blocks, lambda b, dw: dw.at[b // per_group].add(block(b)), jnp.zeros((8, k, m)))


def main(rounds: int) -> None:
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (COPIES, D_MODEL))  # [copies, d_model], sorted by expert
    h = jax.random.normal(keys[1], (COPIES, D_FF))  # [copies, d_ff]
    w = jax.random.normal(keys[2], (len(GROUP_SIZES), D_MODEL, D_FF)) * 0.02  # [experts, d_model, d_ff]
    sizes = jnp.asarray(GROUP_SIZES, jnp.int32)
    assert sum(GROUP_SIZES) == COPIES
    jit = lambda fn: jax.jit(fn, compiler_options=train_lib.compiler_options())
    calls = {
        "grouped forward  x @ w[g]": (jit(lambda x, w: gmm._forward(x, w, sizes, BLOCK, False)), (x, w)),
        "plain            x @ w[0]": (jit(lambda x, w: x @ w[0]), (x, w)),
        "grouped dx       h @ w[g].T": (jit(lambda h, w: gmm._forward(h, w, sizes, BLOCK, True)), (h, w)),
        "plain            h @ w[0].T": (jit(lambda h, w: h @ w[0].T), (h, w)),
        "grouped dw       x[g].T @ h[g]": (jit(lambda x, h: gmm._weight_grad(x, h, sizes, BLOCK, jnp.float32)), (x, h)),
        "plain            x.T @ h": (jit(_tn), (x, h)),
        "dw blocks, results dropped": (jit(lambda x, h: _blocks(x, h, "none")), (x, h)),
        "dw blocks, one accumulator": (jit(lambda x, h: _blocks(x, h, "local")), (x, h)),
        "dw blocks, expert slices": (jit(lambda x, h: _blocks(x, h, "slices")), (x, h)),
    }
    grouped_dw = np.asarray(gmm._weight_grad(x, h, sizes, BLOCK, jnp.float32))  # [experts, d_model, d_ff]
    np.testing.assert_allclose(grouped_dw.sum(0), np.asarray(_tn(x, h)), rtol=1e-4, atol=1e-2)  # each row once
    times = _alternating(list(calls.values()), rounds)
    flops = 2 * COPIES * D_MODEL * D_FF
    print(f"{jax.devices()[0].device_kind}, float32, {rounds} rounds in turns, medians")
    for name, seconds in zip(calls, times):
        print(f"  {name:32s} {seconds * 1e3:7.2f} ms  {flops / seconds / 1e9:5.0f} GFLOP/s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
