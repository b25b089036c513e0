"""`moe quantize SOURCE OUT --format FMT`: a quantized checkpoint, streamed tensor by tensor.

SOURCE is a Hugging Face folder, a `moe convert from-hf` output, a run directory (its newest
checkpoint) or a checkpoint step. Each tensor is read one slice (a layer, or a layer's
expert) at a time, quantized and written, so the full-precision model is never in memory.
OUT gets params/ (Orbax) and config.yaml (the source's, with quant.base set); it is written
under OUT.partial and renamed when complete (moe/convert/stream.py), so a failure leaves
no partial folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from moe.quant.qarray import QuantError

def _source(path: Path):
    """(config, feed) of SOURCE, refusing what holds no full-precision weights."""
    from moe.convert.stream import open_source

    cfg, feed = open_source(path)
    if cfg.quant.base is not None and cfg.lora.rank is None:
        raise QuantError(f"{path} is already quantized ({cfg.quant.base}); quantize its full-precision source")
    if cfg.lora.rank is not None:
        raise QuantError(f"{path} is a LoRA run: merge it first (`moe lora merge`), then quantize the merged weights")
    return cfg, feed


def quantize_checkpoint(source: str, out: str, fmt: str, include=None, exclude=(), block_size: int = 64) -> dict:
    """Write OUT (params/ + config.yaml) with SOURCE's weights quantized; returns byte counts."""
    from moe import config as config_lib
    from moe.checkpoint import ParamWriter
    from moe.convert.stream import written_atomically
    from moe.quant import params as qparams, store

    qparams.check_format(fmt)
    src = Path(source)
    cfg, feed = _source(src)
    include = tuple(include or qparams.DEFAULT_INCLUDE)
    quant = config_lib.QuantConfig(base=fmt, include=include, exclude=tuple(exclude), block_size=block_size)
    qcfg = dataclasses.replace(cfg, quant=quant, train=dataclasses.replace(cfg.train, init_from=None))
    sizes = {"source_bytes": 0, "bytes": 0}
    with written_atomically(Path(out), src) as tmp:
        writer = ParamWriter(tmp / "params", store.to_storage(store.shapes(qcfg)))

        def write(path, index, array):
            sizes["source_bytes"] += array.nbytes
            if not qparams.selected(path, include, quant.exclude):
                sizes["bytes"] += array.nbytes
                return writer.write(path, index, array)
            q = qparams.quantize_weight(path, array, fmt, block_size)
            for field in store.FIELDS:
                if getattr(q, field) is not None:
                    leaf = np.asarray(getattr(q, field))
                    sizes["bytes"] += leaf.nbytes
                    writer.write(path + (field,), index, leaf)

        feed(write)
        writer.close()
        (tmp / "config.yaml").write_text(config_lib.dump(qcfg))
    return sizes


def run_quantize(args) -> int:
    sizes = quantize_checkpoint(args.source, args.out, args.format, args.include, args.exclude, args.block_size)
    print(f"quantized {args.source} -> {args.out} ({args.format}): {sizes['source_bytes'] / 1e9:.3f} GB -> "
          f"{sizes['bytes'] / 1e9:.3f} GB ({sizes['bytes'] / max(sizes['source_bytes'], 1):.3f}x)")
    return 0


def add_parsers(sub) -> None:
    from moe.quant.qarray import FORMATS

    p = sub.add_parser("quantize", help="a quantized checkpoint (int8, int4, nf4, nf4-dq), streamed tensor by tensor")
    p.add_argument("source", help="HF folder, `moe convert from-hf` output, run directory or checkpoint step")
    p.add_argument("out", help="the new folder: params/ + config.yaml")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--include", nargs="*", help="weight paths to quantize (fnmatch; default layers/*: every "
                   "matmul weight in the layers, experts and router included)")
    p.add_argument("--exclude", nargs="*", default=[], help="weight paths to keep (fnmatch), e.g. layers/moe/gate")
    p.add_argument("--block-size", type=int, default=64, help="elements per scale block (int4, nf4)")
    p.set_defaults(func=run_quantize)
