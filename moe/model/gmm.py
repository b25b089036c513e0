"""A grouped matmul over rows sorted by group, with its own backward pass.

    gmm(x_nk, w_gkm, group_sizes_g, block) -> y_nm
    y[rows of group g] = x[rows of group g] @ w[g]; rows after the last group are zero.
    w may be a QArray (moe/quant): each group's weights are dequantized in the loop, one at a time.

On CPU and GPU jax.lax.ragged_dot lowers to a product masked over every group (G times the
work); this computes only the routed rows. A static loop runs over the groups and, inside
it, while loops over the group's rows: whole blocks of `block` rows, then the remainder
in blocks of block / 4, the last of which reaches past the group and keeps those rows'
values by a mask; no padded copy of the rows is ever built. Each group's weights are read in place, once per group,
never gathered per block, and the backward pass adds each block's weight gradient in
place into its group's slice of a float32 carry. Work: the routed rows plus under a quarter block per group.
Each product's carry starts from zeros of its own: XLA merges equal zero buffers into one
and copies it into each loop that writes it in place (the SwiGLU's w1 and w3 products,
their dx and dw), so shared zeros would cost a copy per product (docs/benchmarks.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moe.model.qarray import QArray, as_array


def _zeros(shape, dtype, group_sizes, salt):
    """Zeros that XLA cannot merge with another call's (merged zeros are copied into every
    loop that writes them in place). `salt`: an array (or tree) that is a different one in
    each call, such as the call's weights; its first element is selected only where a group
    size is negative, which never happens, so the value is always exactly 0."""
    first = jax.tree_util.tree_leaves(salt)[0].reshape(-1)[0].astype(dtype)
    return jnp.broadcast_to(jnp.where(group_sizes[0] < 0, first, jnp.zeros((), dtype)), shape)


def _group_bounds(group_sizes):
    ends = jnp.cumsum(group_sizes)
    return ends - group_sizes, ends  # [groups] start and end row of each group


def _over_blocks(start, end, n: int, block: int, body, carry):
    """carry = body(row, rows, mine, carry) over a group's rows [start, end) of n: whole
    blocks of `block` rows (mine=None: every row is the group's), then the rest in blocks of
    a quarter of that. Those may reach past the group (or be moved back inside the n rows);
    mine [rows] then marks the rows that are the group's and not yet done."""
    block = min(block, n)
    tail = min(max(8, block // 4), n)
    full = (end - start) // block
    carry = lax.fori_loop(0, full, lambda b, c: body(start + b * block, block, None, c), carry)
    rest = start + full * block

    def tail_block(b, c):
        first = rest + b * tail  # the first row not done yet
        row = jnp.minimum(first, n - tail)  # where the block can start inside the n rows
        index = row + jnp.arange(tail)
        return body(row, tail, (index >= first) & (index < end), c)

    return lax.fori_loop(0, (end - rest + tail - 1) // tail, tail_block, carry)


def _forward(x_nk, w_gkm, group_sizes, block: int, transpose_w: bool):
    """y = per-group x @ w[g] (or x @ w[g].T when transpose_w), rows past the groups zero."""
    n = x_nk.shape[0]
    m = w_gkm.shape[1] if transpose_w else w_gkm.shape[2]
    starts, ends = _group_bounds(group_sizes)
    contract = ((1,), (1,)) if transpose_w else ((1,), (0,))

    def per_group(g, y):
        w_km = as_array(w_gkm[g])  # this group's weights, read once (a quantized one dequantized here)

        def per_block(row, rows: int, mine, y):
            x_block = lax.dynamic_slice_in_dim(x_nk, row, rows)  # [rows, k]
            y_block = lax.dot_general(x_block, w_km, (contract, ((), ()))).astype(y.dtype)  # [rows, m]
            if mine is not None:  # keep the rows of other groups
                y_block = jnp.where(mine[:, None], y_block, lax.dynamic_slice_in_dim(y, row, rows))
            return lax.dynamic_update_slice_in_dim(y, y_block, row, 0)

        return _over_blocks(starts[g], ends[g], n, block, per_block, y)

    return lax.fori_loop(0, w_gkm.shape[0], per_group, _zeros((n, m), x_nk.dtype, group_sizes, w_gkm))


def _weight_grad(x_nk, dy_nm, group_sizes, block: int, dtype):
    """dw[g] = x[rows of g].T @ dy[rows of g], each block's product added in place into
    the group's slice of one float32 [groups, k, m] carry (no per-group accumulator to
    zero and copy out)."""
    n, k, m = x_nk.shape[0], x_nk.shape[1], dy_nm.shape[1]
    starts, ends = _group_bounds(group_sizes)

    def per_group(g, dw):
        def per_block(row, rows: int, mine, dw):
            x_block = lax.dynamic_slice_in_dim(x_nk, row, rows)
            if mine is not None:  # count each of the group's rows once, and only those
                x_block = jnp.where(mine[:, None], x_block, 0)
            dy_block = lax.dynamic_slice_in_dim(dy_nm, row, rows)
            return dw.at[g].add(
                lax.dot_general(x_block, dy_block, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            )

        return _over_blocks(starts[g], ends[g], n, block, per_block, dw)

    dw = _zeros((group_sizes.shape[0], k, m), jnp.float32, group_sizes, dy_nm)
    return lax.fori_loop(0, group_sizes.shape[0], per_group, dw).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gmm(x_nk, w_gkm, group_sizes, block: int):
    """Grouped matmul: x [rows, k] sorted by group, w [groups, k, m], group_sizes [groups]
    int32 (summing to at most rows) -> [rows, m]. `block` rows per inner step (static)."""
    return _forward(x_nk, w_gkm, group_sizes, block, transpose_w=False)


def _gmm_fwd(x_nk, w_gkm, group_sizes, block):
    return gmm(x_nk, w_gkm, group_sizes, block), (x_nk, w_gkm, group_sizes)


def _gmm_bwd(block, residuals, dy_nm):
    x_nk, w_gkm, group_sizes = residuals
    dx = _forward(dy_nm, w_gkm, group_sizes, block, transpose_w=True)  # dy @ w[g].T per group
    if isinstance(w_gkm, QArray):  # a frozen quantized base (QLoRA): no weight gradient
        return dx, _no_gradient(w_gkm), None
    dw = _weight_grad(x_nk, dy_nm, group_sizes, block, w_gkm.dtype)
    return dx, dw, None


def _no_gradient(tree):
    """Zero cotangents for a tree (float0 for its integer leaves, as JAX requires)."""

    def zero(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.zeros_like(x)
        return np.zeros(x.shape, jax.dtypes.float0)

    return jax.tree_util.tree_map(zero, tree)


gmm.defvjp(_gmm_fwd, _gmm_bwd)
