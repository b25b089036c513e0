"""Quantized params on disk: an Orbax params checkpoint whose quantized weights are small
trees of arrays (codes, scale, and for nf4-dq scale2 and offset) and whose config.yaml's
`quant` section says the format, so the QArrays' static layout is rebuilt from the config."""

from __future__ import annotations

import jax
from flax import traverse_util

from moe.config import Config
from moe.quant import params as qparams
from moe.quant.qarray import QArray

FIELDS = ("codes", "scale", "scale2", "offset")


def shapes(cfg: Config):
    """The params' ShapeDtypeStructs as `cfg` stores them (QArrays of them where quantized)."""
    from moe.model import param_shapes

    q = cfg.quant
    return qparams.abstract(param_shapes(cfg.model), q.base, q.include, q.exclude, q.block_size)


def stored_quantized(cfg: Config) -> bool:
    """Whether a checkpoint with this config stores quantized weights (a `moe quantize`
    output); a QLoRA run's `quant` describes the base it trains over, not its checkpoints."""
    return cfg.quant.base is not None and cfg.lora.rank is None


def _is_q(x) -> bool:
    return isinstance(x, QArray)


def to_storage(tree):
    """QArrays as {field: array} dicts (Orbax saves plain trees)."""
    return jax.tree_util.tree_map(
        lambda x: {f: getattr(x, f) for f in FIELDS if getattr(x, f) is not None} if _is_q(x) else x,
        tree, is_leaf=_is_q)


def from_storage(stored, abstract):
    """The inverse of to_storage, with each QArray's layout from `abstract` (see shapes())."""
    flat_stored = traverse_util.flatten_dict(stored)
    out = {}
    for path, leaf in traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: _is_q(x)).items():
        if _is_q(leaf):
            out[path] = leaf.replace(**{f: flat_stored[path + (f,)] for f in FIELDS if getattr(leaf, f) is not None})
        else:
            out[path] = flat_stored[path]
    return traverse_util.unflatten_dict(out)
