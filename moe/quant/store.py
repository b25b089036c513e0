"""Quantized params on disk: an Orbax params checkpoint whose quantized weights are small
trees of arrays (codes, scale, and for nf4-dq scale2 and offset) and whose config.yaml's
`quant` section says the format, so the QArrays' static layout is rebuilt from the config.

`quantize_checkpoint` (`moe quantize`) writes one from a Hugging Face folder, a converted
output, a run directory (its newest checkpoint) or a checkpoint step: each tensor is read
one slice (a layer, or a layer's expert) at a time, quantized and written, so the
full-precision model is never in memory. OUT gets params/ and config.yaml (the source's,
with quant.base set), written under OUT.partial and renamed when complete."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from moe import config as config_lib
from moe.checkpoint.params import ParamWriter
from moe.config import Config
from moe.convert.stream import open_source, written_atomically
from moe.model import param_shapes
from moe.model.qarray import QArray, QuantError
from moe.quant import params as qparams

FIELDS = ("codes", "scale", "scale2", "offset")


def shapes(cfg: Config):
    """The params' ShapeDtypeStructs as `cfg` stores them (QArrays of them where quantized)."""
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
        tree,
        is_leaf=_is_q,
    )


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


def _source(path: Path, fmt: str):
    """(config, feed) of SOURCE, refusing what holds no full-precision weights."""
    cfg, feed = open_source(path, desc=f"quantizing to {fmt}")
    if cfg.quant.base is not None and cfg.lora.rank is None:
        raise QuantError(f"{path} is already quantized ({cfg.quant.base}); quantize its full-precision source")
    if cfg.lora.rank is not None:
        raise QuantError(f"{path} is a LoRA run: merge it first (`moe lora merge`), then quantize the merged weights")
    return cfg, feed


def quantize_checkpoint(source: str, out: str, fmt: str, include=None, exclude=(), block_size: int = 64) -> dict:
    """Write OUT (params/ + config.yaml) with SOURCE's weights quantized; returns byte counts."""
    qparams.check_format(fmt)
    src = Path(source)
    cfg, feed = _source(src, fmt)
    include = tuple(include or qparams.DEFAULT_INCLUDE)
    quant = config_lib.QuantConfig(base=fmt, include=include, exclude=tuple(exclude), block_size=block_size)
    qcfg = dataclasses.replace(cfg, quant=quant, train=dataclasses.replace(cfg.train, init_from=None))
    sizes = {"source_bytes": 0, "bytes": 0}
    with written_atomically(Path(out), src) as tmp:
        writer = ParamWriter(tmp / "params", to_storage(shapes(qcfg)))

        def write(path, index, array):
            sizes["source_bytes"] += array.nbytes
            if not qparams.selected(path, include, quant.exclude):
                sizes["bytes"] += array.nbytes
                return writer.write(path, index, array)
            q = qparams.quantize_weight(path, array, fmt, block_size)
            for field in FIELDS:
                if getattr(q, field) is not None:
                    leaf = np.asarray(getattr(q, field))
                    sizes["bytes"] += leaf.nbytes
                    writer.write(path + (field,), index, leaf)

        feed(write)
        writer.close()
        (tmp / "config.yaml").write_text(config_lib.dump(qcfg))
    return sizes
