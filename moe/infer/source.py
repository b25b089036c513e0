"""Where inference reads a model from: a Hugging Face folder, a `moe convert from-hf` output,
a run directory (its newest checkpoint) or one checkpoint step directory. Only params are
read, never the optimizer state."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from moe import config as config_lib
from moe import storage
from moe import tokenizer as tokenizer_lib
from moe.config import Config, ConfigError, ModelConfig
from moe.convert.hf import NP_DTYPES
from moe.convert.stream import HINT, is_hf as _is_hf
from moe.quant.qarray import QArray


class SourceError(ValueError):
    """A model source that cannot be read; the message says what was expected."""


@dataclasses.dataclass(frozen=True)
class Source:
    path: Path
    config: Config  # the run's config (HF folders: defaults around the model)
    params: dict  # numpy arrays in the requested dtype
    tokenizer: str  # a .model path or "mistral-v1"

    @property
    def model(self) -> ModelConfig:
        return self.config.model


def newest_step(run_dir: Path) -> Path:
    steps = sorted((int(p.name), p) for p in (run_dir / "checkpoints").iterdir()
                   if p.name.isdigit() and (p / "params" / "_METADATA").exists())
    if not steps:
        raise SourceError(f"{run_dir} is a run directory without a finished checkpoint; train it further "
                          "or give a checkpoint step directory")
    return steps[-1][1]


def checkpoint_of(path: Path) -> tuple[Path, Path, Config]:
    """(params dir, the step dir it belongs to, the run's config) of a run directory (its
    newest checkpoint), a checkpoint step or a converted folder."""
    from moe.convert import ConversionError
    from moe.convert.hf import find_checkpoint

    step = newest_step(path) if (path / "checkpoints").is_dir() else path
    try:
        params_dir, config_path = find_checkpoint(step)
        return params_dir, step, config_lib.load(config_path)
    except (ConversionError, ConfigError, OSError, ValueError) as e:
        raise SourceError(f"{step}: {e}; {HINT}") from None


def _from_hf(path: Path) -> tuple[Config, dict, str]:
    from moe.convert import ConversionError, load_hf

    try:
        model, params = load_hf(path)
    except (ConversionError, OSError, ValueError) as e:
        raise SourceError(f"{path}: cannot read the Hugging Face folder: {e}") from None
    tokenizer = path / "tokenizer.model"
    return Config(model=model), params, str(tokenizer) if tokenizer.is_file() else tokenizer_lib.MISTRAL_V1


def _from_checkpoint(path: Path) -> tuple[Config, dict, str]:
    from moe.checkpoint import restore_params

    params_dir, path, cfg = checkpoint_of(path)
    try:
        params = restore_params(params_dir)
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: {e}; {HINT}") from None
    from moe.quant import store

    if store.stored_quantized(cfg):  # a `moe quantize` output: rebuild its QArrays
        params = store.from_storage(params, store.shapes(cfg))
    if cfg.lora.rank is not None:
        cfg, params = _merged_lora(cfg, params, path)
    tokenizer = params_dir.parent / "tokenizer.model"  # a converted folder keeps the HF tokenizer
    return cfg, params, str(tokenizer) if tokenizer.is_file() else cfg.data.tokenizer


def _merged_lora(cfg: Config, adapters: dict, path: Path) -> tuple[Config, dict]:
    """A LoRA run's checkpoint (adapters, maybe the router) over its base (train.init_from,
    read again), folded into plain weights: the config and params of the merged model."""
    from moe.tune.merge import merge
    from moe.tune.trainable import combine

    base_path = storage.location(cfg.train.init_from)
    if not base_path.is_dir():
        raise SourceError(f"{path} is a LoRA run whose base (train.init_from = {base_path}) is not there; "
                          "run from the folder it was trained from, or merge it with `moe lora merge`")
    _, base, _ = (_from_hf if _is_hf(base_path) else _from_checkpoint)(base_path)
    if cfg.quant.base is not None:  # QLoRA: merged into the dequantized base it trained over, never into 4 bits
        from moe.quant.params import dequantize_params, quantize_params

        q = cfg.quant
        base = dequantize_params(quantize_params(base, q.base, q.include, q.exclude, q.block_size))
    params = merge(combine(cfg, adapters, base), cfg.lora)
    plain = dataclasses.replace(cfg, lora=config_lib.LoRAConfig(), quant=config_lib.QuantConfig(),
                                train=dataclasses.replace(cfg.train, init_from=None, objective="lm"),
                                data=dataclasses.replace(cfg.data, format="auto"))
    return plain, params


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
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype) if isinstance(a, QArray) else  # computes in dtype
                                    np.asarray(a).astype(NP_DTYPES[dtype]), params,
                                    is_leaf=lambda a: isinstance(a, QArray))
    model = dataclasses.replace(cfg.model, dtype=dtype, param_dtype=dtype)
    cfg = dataclasses.replace(cfg, model=model)
    tokenizer = tokenizer or found_tokenizer
    try:
        tokenizer_lib.check_vocab(tokenizer, model.vocab_size)
    except (ValueError, FileNotFoundError) as e:
        raise SourceError(f"{e}; pass --tokenizer with the model's own tokenizer") from None
    return Source(path, cfg, params, tokenizer)
