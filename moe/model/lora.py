"""Low-rank adapters (LoRA, Hu et al. 2021) on the model's matmul weights, experts included.

An adapted weight W [..., in, out] gets two parameters of its own beside it, `<name>_lora_a`
A [..., in, r] and `<name>_lora_b` B [..., r, out], and computes

    x W + scale * (dropout(x) A) B,     scale = alpha / r   (rsLoRA: alpha / sqrt(r))

B starts at zero, so an adapter that has not trained leaves the model exactly as it was.
Leading dimensions are the experts: each expert has its own pair, and the MoE dispatch
(moe/model/dispatch.py) applies it to the rows routed to that expert with the same grouped
matmul as the base weight, so W + A B is never formed during training.

Targets: q, k, v, o (attention), w1, w2, w3 (the dense MLP or every expert; "mlp" is all
three) and gate (the router).

Serving several adapters at once (moe/serve/adapters.py) stacks them side by side along the
rank dimension, A = [A_1 | A_2 | ...], and gives every row a selector over those columns
(1 on its own adapter's, 0 elsewhere, all 0 for the base): (x A * select) B is then each
row's own adapter, whichever weights and dispatch path it meets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from moe.config import LoRAConfig
from moe.model.qarray import as_array

MLP_TARGETS = ("w1", "w2", "w3")
TARGETS = ("q", "k", "v", "o", *MLP_TARGETS, "gate")
DROPOUT_RNG = "lora_dropout"


def expand_targets(targets) -> frozenset[str]:
    """The weight names a `lora.targets` list adapts ("mlp" stands for w1, w2 and w3)."""
    out = set()
    for t in targets:
        out |= set(MLP_TARGETS) if t == "mlp" else {t}
    return frozenset(out)


def scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@struct.dataclass
class Adapted:
    """A base weight (an array, or a QArray: QLoRA) with its adapter pair; the dispatch and
    projections accept it wherever they accept a plain weight (see `matmul`)."""

    w: jax.Array
    a: jax.Array
    b: jax.Array
    key: Optional[jax.Array] = None  # dropout randomness; None: no dropout
    select: Optional[jax.Array] = None  # [rows of x (broadcast), rank] 0/1: the columns of A each row uses
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    # > 0: the last select_cols columns of the MoE dispatch's input are each row's `select`
    # (they travel with the token through any sort or expert-parallel exchange; dispatch._swiglu)
    select_cols: int = struct.field(pytree_node=False, default=0)

    @property
    def shape(self):
        return self.w.shape

    def astype(self, dtype) -> Adapted:
        return self.replace(w=self.w.astype(dtype), a=self.a.astype(dtype), b=self.b.astype(dtype))


def matmul(mm: Callable, x, w, mm_b: Optional[Callable] = None):
    """mm(x, w) for a plain weight; for an adapted one mm(x, W) + scale * mm_b(mm(x', A), B),
    x' being x after dropout. mm_b (default mm) multiplies by B: it differs from mm where the
    first product changes the layout (the dense dispatch's [experts, tokens, r])."""
    if not isinstance(w, Adapted):
        return mm(x, w)
    x_a = x
    if w.dropout > 0 and w.key is not None:
        keep = jax.random.bernoulli(w.key, 1.0 - w.dropout, x.shape)
        x_a = jnp.where(keep, x / (1.0 - w.dropout), 0).astype(x.dtype)
    low = mm(x_a, w.a)
    if w.select is not None:
        low = low * w.select.astype(low.dtype)
    return mm(x, w.w) + (w.scale * (mm_b or mm)(low, w.b)).astype(x.dtype)


def _contract(x, w, n_in: int):
    """x [..., in dims] times w [in dims..., out dims...] as one einsum (no reshape of a
    sharded weight, which a tensordot would add)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    n_batch, n_out = x.ndim - n_in, w.ndim - n_in
    batch, ins, outs = letters[:n_batch], letters[n_batch : x.ndim], letters[x.ndim : x.ndim + n_out]
    return jnp.einsum(f"{batch}{ins},{ins}{outs}->{batch}{outs}", x, w)


def project(x, w, n_in: int):
    """x [..., in dims] times w [in dims..., out dims...] (n_in input dims), adapters included."""
    return matmul(lambda x_, w_: _contract(x_, as_array(w_), n_in), x, w, lambda x_, w_: _contract(x_, w_, 1))


def _uniform_fan_in(fan_in: int):
    """A's init, as PEFT's (torch's kaiming_uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def adapt(module: nn.Module, name: str, w, lora, *, n_lead: int, n_in: int, axes: tuple, dtype, select=None):
    """`w` (the parameter `name` of `module`, with logical `axes`) with an adapter when
    `lora` (a LoRAConfig or None) targets it; n_lead leading (expert) dims, then n_in input dims.
    select: each row's adapter columns when several adapters are served at once (see above)."""
    if lora is None or lora.rank is None or name not in expand_targets(lora.targets):
        return w
    r, shape = lora.rank, w.shape
    lead, ins, outs = shape[:n_lead], shape[n_lead : n_lead + n_in], shape[n_lead + n_in :]
    lead_ax, in_ax, out_ax = axes[:n_lead], axes[n_lead : n_lead + n_in], axes[n_lead + n_in :]
    a = module.param(
        f"{name}_lora_a",
        nn.with_logical_partitioning(_uniform_fan_in(math.prod(ins)), (*lead_ax, *in_ax, "lora")),
        (*lead, *ins, r),
        dtype,
    )
    b = module.param(
        f"{name}_lora_b",
        nn.with_logical_partitioning(nn.initializers.zeros, (*lead_ax, "lora", *out_ax)),
        (*lead, r, *outs),
        dtype,
    )
    key = module.make_rng(DROPOUT_RNG) if lora.dropout > 0 and module.has_rng(DROPOUT_RNG) else None
    return Adapted(w, a, b, key, select, scale(lora.alpha, r, lora.rslora), lora.dropout)


def is_adapter(path: tuple[str, ...]) -> bool:
    """True for the path of an adapter parameter (`..._lora_a` / `..._lora_b`)."""
    return path[-1].endswith(("_lora_a", "_lora_b"))


def merged_weight(w, a, b, factor: float) -> np.ndarray:
    """W [*lead, *ins, *outs] + factor * A [*lead, *ins, r] B [*lead, r, *outs], in float32
    (`moe lora merge` folds adapters into their weights with it)."""
    w, a, b = (np.asarray(x, np.float32) for x in (w, a, b))
    n_lead = (a.ndim - 1) + (b.ndim - 1) - w.ndim
    lead = w.shape[:n_lead]
    a2 = a.reshape(*lead, -1, a.shape[-1])  # [*lead, in, r]
    b2 = b.reshape(*lead, b.shape[n_lead], -1)  # [*lead, r, out]
    return w + factor * np.matmul(a2, b2).reshape(w.shape)


def merge(params, lora: LoRAConfig) -> dict:
    """Plain params (no adapter left) equal in function to `params` with `lora`'s adapters."""
    flat = traverse_util.flatten_dict(params)
    factor = scale(lora.alpha, lora.rank, lora.rslora)
    out = {}
    for path, value in flat.items():
        if is_adapter(path):
            continue
        a_path = (*path[:-1], f"{path[-1]}_lora_a")
        if a_path in flat:
            b = flat[(*path[:-1], f"{path[-1]}_lora_b")]
            value = merged_weight(value, flat[a_path], b, factor).astype(np.asarray(value).dtype)
        out[path] = value
    return traverse_util.unflatten_dict(out)
