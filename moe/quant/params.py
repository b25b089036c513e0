"""Which parameters quantize, quantizing a params pytree, and what it weighs.

Every matmul weight has a known layout: its trailing dims are the matrix (input dims first,
as the model stores them) and the dims before them a stack (layers; layers and experts).
By default every weight in the layers quantizes, experts and router included; the embedding
and the LM head stay in the compute dtype unless named in `include`; norms never quantize.
Names are '/'-joined paths matched with fnmatch: "layers/moe/w*", "lm_head/kernel".
"""

from __future__ import annotations

import fnmatch
import functools
import math

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe.model import param_shapes
from moe.model.params import count_params
from moe.model.qarray import BLOCK, FORMATS, QArray, QuantError, quantize

# path suffix -> (dims of the matrix, input dims among them); None input dims: a lookup table
LAYOUTS = {
    ("attn", "q"): (3, 1),
    ("attn", "k"): (3, 1),
    ("attn", "v"): (3, 1),
    ("attn", "o"): (3, 2),
    ("mlp", "w1"): (2, 1),
    ("mlp", "w3"): (2, 1),
    ("mlp", "w2"): (2, 1),
    ("moe", "gate"): (2, 1),
    ("moe", "w1"): (2, 1),
    ("moe", "w3"): (2, 1),
    ("moe", "w2"): (2, 1),
    ("shared", "w1"): (2, 1),  # the MoE block's shared experts
    ("shared", "w3"): (2, 1),
    ("shared", "w2"): (2, 1),
    ("lm_head", "kernel"): (2, 1),
    ("embed", "embedding"): (2, None),
}
DEFAULT_INCLUDE = ("layers/*",)


def name(path: tuple[str, ...]) -> str:
    return "/".join(path)


def layout(path: tuple[str, ...]):
    """(matrix dims, input dims) of a quantizable parameter, or None (norms, adapters)."""
    return LAYOUTS.get(tuple(path[-2:]))


def selected(path: tuple[str, ...], include=DEFAULT_INCLUDE, exclude=()) -> bool:
    n = name(path)
    return (
        layout(path) is not None
        and any(fnmatch.fnmatchcase(n, p) for p in include)
        and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    )


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise QuantError(f"unknown quantization format {fmt!r}; choose from {', '.join(FORMATS)}")


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize_one(w, fmt: str, block_size: int, n_lead: int, n_in):
    return quantize(w, fmt, block_size, n_lead=n_lead, n_in=n_in)


def quantize_weight(path: tuple[str, ...], w, fmt: str, block_size: int = BLOCK) -> QArray:
    """One parameter quantized by its layout (compiled once per shape and format)."""
    matrix_dims, n_in = layout(path)
    try:
        return _quantize_one(w, fmt, block_size, w.ndim - matrix_dims, n_in)
    except QuantError as e:
        raise QuantError(f"{name(path)} {tuple(w.shape)}: {e}") from None


def quantize_params(params, fmt: str, include=DEFAULT_INCLUDE, exclude=(), block_size: int = BLOCK):
    """params with every selected weight replaced by its QArray, one tensor at a time;
    the rest (and anything already quantized) as it was. A weight placed on a mesh gives
    a QArray whose stack dims keep the weight's placement (see leaf_shardings)."""
    check_format(fmt)
    flat = traverse_util.flatten_dict(params, is_leaf=lambda _, x: isinstance(x, QArray))
    out = {}
    for path in list(flat):
        w = flat.pop(path)  # drop our reference as we go: one full-precision tensor at a time
        if isinstance(w, QArray) or not selected(path, include, exclude):
            out[path] = w
            continue
        q = quantize_weight(path, w, fmt, block_size)
        if isinstance(getattr(w, "sharding", None), jax.sharding.NamedSharding):
            q = jax.device_put(q, leaf_shardings(q, w.sharding))
        out[path] = q
    return traverse_util.unflatten_dict(out)


def dequantize_params(params, dtype=None):
    """Every QArray back to an array (its own compute dtype, or `dtype`)."""
    return jax.tree_util.tree_map(
        lambda w: w.dequantize(dtype) if isinstance(w, QArray) else w, params, is_leaf=lambda w: isinstance(w, QArray)
    )


def abstract(params_shapes, fmt: str | None, include=DEFAULT_INCLUDE, exclude=(), block_size: int = BLOCK):
    """The ShapeDtypeStructs of the quantized params, from shapes alone (nothing allocated)."""
    if fmt is None:
        return params_shapes
    return jax.eval_shape(lambda p: quantize_params(p, fmt, include, exclude, block_size), params_shapes)


def nbytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def bytes_table(shapes, include=DEFAULT_INCLUDE, exclude=()) -> list[tuple[str, int, int]]:
    """(format, bytes of all params, bytes of the quantized weights alone) for the params
    as given (their dtype: the unquantized baseline) and each format."""
    base = nbytes(shapes)
    rows = [(jnp.dtype(jax.tree_util.tree_leaves(shapes)[0].dtype).name, base, 0)]
    for fmt in FORMATS:
        q = abstract(shapes, fmt, include, exclude)
        quantized = [
            w for w in jax.tree_util.tree_leaves(q, is_leaf=lambda w: isinstance(w, QArray)) if isinstance(w, QArray)
        ]
        rows.append((fmt, nbytes(q), nbytes(quantized)))
    return rows


def format_bytes(cfg, fmt: str) -> str:
    """`moe params --quant FMT`: the params' bytes unquantized (in the compute dtype) and in
    every format, FMT marked; what is not quantized stays in the compute dtype."""
    check_format(fmt)
    dtype = jnp.dtype(cfg.model.dtype)
    shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_shapes(cfg.model))
    q = cfg.quant
    rows = bytes_table(shapes, q.include, q.exclude)
    n_quantized = sum(
        math.prod(s.shape) for p, s in traverse_util.flatten_dict(shapes).items() if selected(p, q.include, q.exclude)
    )
    total = count_params(cfg.model).total
    lines = [
        f"weights by format (quantized: {n_quantized:,} of {total:,} parameters, "
        f"{', '.join(q.include)}{' minus ' + ', '.join(q.exclude) if q.exclude else ''}; the rest in {dtype.name}):",
        f"{'format':<10}{'GB':>10}{'GiB':>10}{'bits/param (quantized)':>26}",
    ]
    for name_, size, quantized in rows:
        bits = f"{8 * quantized / n_quantized:.3f}" if quantized else f"{8 * dtype.itemsize}"
        mark = "  <-" if name_ == fmt else ""
        lines.append(f"{name_:<10}{size / 1e9:>10.2f}{size / 2**30:>10.2f}{bits:>26}{mark}")
    return "\n".join(lines)


def leaf_shardings(q: QArray, weight_sharding: jax.sharding.NamedSharding):
    """Shardings for a QArray's leaves from its weight's: the stack dims (layers, experts)
    placed as the weight's, the codes and scales of each matrix whole on their device."""
    spec = tuple(weight_sharding.spec) + (None,) * len(q.lead)
    return jax.tree_util.tree_map(lambda _: NamedSharding(weight_sharding.mesh, P(*spec[: len(q.lead)])), q)
