"""`moe lora merge`: a LoRA run's adapters folded into its base, streamed slice by slice.

The base (the run's train.init_from: a Hugging Face folder, a converted output, a run or a
step) is read one slice at a time (a layer, or one layer's expert: moe/convert/stream.py);
each slice of an adapted weight becomes W + scale * A B (model/lora.py's merged_weight) with
the adapters' slice, a trained router replaces its base, and the slice is written at once.
So host memory holds the adapters and about one layer, never the model: an 8x7B merges on
a machine that could not hold it. A QLoRA run merges into the dequantized base it trained
over (each slice quantized and decoded as the run saw it), never into 4 bits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import traverse_util

from moe import config as config_lib
from moe import storage
from moe.checkpoint.params import ParamWriter, restore_params, save_params
from moe.checkpoint.runs import SourceError, checkpoint_of
from moe.config import Config
from moe.convert.hf import NP_DTYPES
from moe.convert.stream import open_source
from moe.infer import source as source_lib
from moe.model import param_shapes
from moe.model.lora import merged_weight, scale
from moe.quant import params as qparams
from moe.training.trainable import merged_config


def lora_run(source: str | Path) -> tuple[Config, dict, Path]:
    """(run config, its trainable params: adapters, and the router if it trained, step dir)
    of a LoRA run directory (its newest checkpoint) or checkpoint step."""
    path = Path(source)
    if not path.is_dir():
        raise SourceError(f"{source}: no such directory; give a LoRA run directory or one of its checkpoint steps")
    params_dir, step, cfg = checkpoint_of(path)
    if cfg.lora.rank is None:
        raise SourceError(
            f"{source} is not a LoRA run (its config has no lora.rank); its checkpoints are already plain weights"
        )
    return cfg, restore_params(params_dir), step


def _base_slice(cfg: Config, path: tuple[str, ...], array) -> np.ndarray:
    """A slice of the base as the run computed with it: float32, and for QLoRA the
    quantized-then-decoded weight."""
    q = cfg.quant
    if q.base is not None and qparams.selected(path, q.include, q.exclude):
        return np.asarray(
            qparams.quantize_weight(path, np.asarray(array, np.float32), q.base, q.block_size).dequantize(np.float32)
        )
    return np.asarray(array, np.float32)


def merge_run(source: str | Path, out_dir: Path) -> tuple[Config, Path]:
    """Write OUT_DIR/params and OUT_DIR/config.yaml: the LoRA run at `source` merged.
    Returns (the run's config, the step merged)."""
    cfg, trained, step = lora_run(source)
    base_path = storage.location(cfg.train.init_from)
    if not base_path.is_dir():
        raise SourceError(
            f"{source} is a LoRA run whose base (train.init_from = {base_path}) is not there; "
            "run from the folder it was trained from"
        )
    base_cfg, feed = open_source(base_path)
    if base_cfg.lora.rank is not None:
        raise SourceError(f"the base {base_path} of {source} is itself a LoRA run; merge that one first")
    if base_cfg.quant.base is not None:  # QLoRA over a `moe quantize` output: 4-bit in memory, merged whole
        merged = source_lib.load(step, dtype=cfg.model.param_dtype)
        save_params(out_dir / "params", merged.params)
        (out_dir / "config.yaml").write_text(config_lib.dump(merged_config(cfg)))
        return cfg, step
    flat = traverse_util.flatten_dict(trained)
    factor = scale(cfg.lora.alpha, cfg.lora.rank, cfg.lora.rslora)
    model = cfg.model
    dtype = NP_DTYPES[model.param_dtype]
    writer = ParamWriter(out_dir / "params", param_shapes(model))

    def write(path, index, array):
        path = tuple(path)
        value = flat[path][index] if path in flat else _base_slice(cfg, path, array)
        a_path = (*path[:-1], f"{path[-1]}_lora_a")
        if a_path in flat:
            b = flat[(*path[:-1], f"{path[-1]}_lora_b")][index]
            value = merged_weight(value, flat[a_path][index], b, factor)
        writer.write(path, index, np.asarray(value).astype(dtype))

    feed(write)
    writer.close()
    plain = merged_config(cfg)
    (out_dir / "config.yaml").write_text(config_lib.dump(plain))
    return cfg, step
