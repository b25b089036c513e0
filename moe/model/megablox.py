"""The TPU grouped matmul: jax's Pallas megablox kernels (gmm forward; gmm and tgmm for the
backward) behind the signature of moe/model/gmm.py, for the "megablox" dispatch.

    grouped_matmul(x_md, w_edf, group_sizes) -> y_mf   # rows of group e times w[e]

megablox needs the row count to divide by its row tile and leaves rows outside every group
unwritten (NaN in interpret mode), so rows are padded to whole tiles here and every row past
the groups is zero in the output and in x's gradient, as jax.lax.ragged_dot gives. The
kernel is chosen when the program is lowered: the compiled Mosaic kernel for TPU, Pallas'
interpreter elsewhere (slow; for tests on CPU), so `moe aot` on a CPU host compiles the
real kernel into a TPU plan.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

# the kernels' module (the package's `gmm` name is the custom-VJP op, not this module)
kernels = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

LANE = 128  # TPU tiles of the k and n dimensions are multiples of the 128-wide lane


def _lane_tile(d: int) -> int:
    """The largest multiple of the lane width up to 1024 that divides d (d itself when d is
    not a multiple of the lane width)."""
    if d % LANE:
        return d
    return max(t for t in range(LANE, min(1024, d) + 1, LANE) if d % t == 0)


def tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(row, k, n) tiles: rows in tiles of up to 512, k and n in tiles of up to 1024 lanes
    that divide them."""
    tm = min(512, max(8, 1 << (max(m, 1) - 1).bit_length()))
    return tm, _lane_tile(k), _lane_tile(n)


def _call(kernel, *args, **kwargs):
    """kernel(*args, **kwargs) compiled on TPU and interpreted on any other platform."""
    return jax.lax.platform_dependent(
        *args,
        tpu=functools.partial(kernel, **kwargs, interpret=False),
        default=functools.partial(kernel, **kwargs, interpret=True),
    )


def _rows_in_groups(y, group_sizes):
    return jnp.where(jnp.arange(y.shape[0])[:, None] < jnp.sum(group_sizes), y, jnp.zeros((), y.dtype))


@jax.custom_vjp
def _gmm(x_md, w_edf, group_sizes):
    m, k = x_md.shape
    y = _call(
        kernels.gmm, x_md, w_edf, group_sizes, preferred_element_type=x_md.dtype, tiling=tiling(m, k, w_edf.shape[2])
    )
    return _rows_in_groups(y, group_sizes)


def _gmm_fwd(x_md, w_edf, group_sizes):
    return _gmm(x_md, w_edf, group_sizes), (x_md, w_edf, group_sizes)


def _gmm_bwd(residuals, dy_mf):
    x_md, w_edf, group_sizes = residuals
    m, k = x_md.shape
    n = w_edf.shape[2]
    dx = _call(
        kernels.gmm,
        dy_mf,
        w_edf,
        group_sizes,
        preferred_element_type=x_md.dtype,
        tiling=tiling(m, n, k),
        transpose_rhs=True,
    )  # dy [m, n] @ w[e].T
    dw = _call(
        kernels.tgmm,
        x_md.swapaxes(0, 1),
        dy_mf,
        group_sizes,
        preferred_element_type=w_edf.dtype,
        tiling=tiling(m, k, n),
        num_actual_groups=w_edf.shape[0],
    )  # x[g].T @ dy[g] per group
    return _rows_in_groups(dx, group_sizes), dw, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def grouped_matmul(x_md, w_edf, group_sizes):
    """x [m, k] with rows grouped by expert (group_sizes [experts], rows past their sum
    belong to no group) times w [experts, k, n]: [m, n]."""
    m = x_md.shape[0]
    tm = tiling(m, x_md.shape[1], w_edf.shape[2])[0]
    padded = -(-m // tm) * tm
    x_pad = jnp.pad(x_md, ((0, padded - m), (0, 0))) if padded != m else x_md
    return _gmm(x_pad, w_edf, group_sizes.astype(jnp.int32))[:m]
