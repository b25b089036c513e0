"""Where inference reads a model from: a Hugging Face folder, a `moe convert from-hf` output,
a run directory (its newest checkpoint) or one checkpoint step directory. Only params are
read, never the optimizer state."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from moe import storage
from moe.checkpoint.params import restore_params
from moe.checkpoint.runs import HINT, SourceError, checkpoint_of
from moe.checkpoint.runs import is_hf as _is_hf
from moe.config import Config, ModelConfig
from moe.convert.hf import NP_DTYPES, load_hf
from moe.convert.table import ConversionError
from moe.data import tokenizer as tokenizer_lib
from moe.model.lora import merge
from moe.model.qarray import QArray
from moe.quant import store
from moe.quant.params import dequantize_params, quantize_params
from moe.training.trainable import combine, merged_config


@dataclasses.dataclass(frozen=True)
class Source:
    path: Path
    config: Config  # the run's config (HF folders: defaults around the model)
    params: dict  # numpy arrays in the requested dtype
    tokenizer: str  # a .model path or "mistral-v1"

    @property
    def model(self) -> ModelConfig:
        return self.config.model


def _from_hf(path: Path) -> tuple[Config, dict, str]:
    try:
        model, params = load_hf(path)
    except (ConversionError, OSError, ValueError) as e:
        raise SourceError(f"{path}: cannot read the Hugging Face folder: {e}") from None
    tokenizer = path / "tokenizer.model"
    return Config(model=model), params, str(tokenizer) if tokenizer.is_file() else tokenizer_lib.MISTRAL_V1


def _from_checkpoint(path: Path) -> tuple[Config, dict, str]:
    params_dir, path, cfg = checkpoint_of(path)
    try:
        params = restore_params(params_dir)
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: {e}; {HINT}") from None
    if store.stored_quantized(cfg):  # a `moe quantize` output: rebuild its QArrays
        params = store.from_storage(params, store.shapes(cfg))
    if cfg.lora.rank is not None:
        cfg, params = _merged_lora(cfg, params, path)
    tokenizer = params_dir.parent / "tokenizer.model"  # a converted folder keeps the HF tokenizer
    return cfg, params, str(tokenizer) if tokenizer.is_file() else cfg.data.tokenizer


def _merged_lora(cfg: Config, adapters: dict, path: Path) -> tuple[Config, dict]:
    """A LoRA run's checkpoint (adapters, maybe the router) over its base (train.init_from,
    read again), folded into plain weights: the config and params of the merged model."""
    base_path = storage.location(cfg.train.init_from)
    if not base_path.is_dir():
        raise SourceError(
            f"{path} is a LoRA run whose base (train.init_from = {base_path}) is not there; "
            "run from the folder it was trained from, or merge it with `moe lora merge`"
        )
    _, base, _ = (_from_hf if _is_hf(base_path) else _from_checkpoint)(base_path)
    if cfg.quant.base is not None:  # QLoRA: merged into the dequantized base it trained over, never into 4 bits
        q = cfg.quant
        base = dequantize_params(quantize_params(base, q.base, q.include, q.exclude, q.block_size))
    params = merge(combine(cfg, adapters, base), cfg.lora)
    return merged_config(cfg), params


def load(source: str | Path, dtype: str = "float32", tokenizer: str | None = None) -> Source:
    """The model at `source` with params cast to `dtype`, computing in `dtype` (quantized
    weights stay quantized and dequantize to `dtype`)."""
    path = storage.location(source)  # local or gs:// (a Hugging Face folder must be local)
    if not path.exists():
        raise SourceError(f"{source}: no such file or directory; {HINT}")
    if not path.is_dir():
        raise SourceError(f"{source} is a file; {HINT}")
    if dtype not in NP_DTYPES:
        raise SourceError(f"--dtype must be one of {sorted(NP_DTYPES)}, got {dtype!r}")
    cfg, params, found_tokenizer = (_from_hf if _is_hf(path) else _from_checkpoint)(path)
    params = jax.tree_util.tree_map(
        lambda a: (
            a.astype(dtype)
            if isinstance(a, QArray)
            # computes in dtype
            else np.asarray(a).astype(NP_DTYPES[dtype])
        ),
        params,
        is_leaf=lambda a: isinstance(a, QArray),
    )
    model = dataclasses.replace(cfg.model, dtype=dtype, param_dtype=dtype)
    cfg = dataclasses.replace(cfg, model=model)
    tokenizer = tokenizer or found_tokenizer
    try:
        tokenizer_lib.check_vocab(tokenizer, model.vocab_size)
    except (ValueError, FileNotFoundError) as e:
        raise SourceError(f"{e}; pass --tokenizer with the model's own tokenizer") from None
    return Source(path, cfg, params, tokenizer)
