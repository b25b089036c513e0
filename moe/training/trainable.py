"""Which parameters train, and how the model's params are put back together.

    full fine-tune  trainable = every param; frozen = {} (DPO: the reference model, a copy
                    of the starting params)
    LoRA            trainable = the adapters (+ the router with lora.train_router);
                    frozen = the base model, whole (it is also DPO's reference)

The optimizer and the gradients see only `trainable`: the frozen base has no gradients and
no optimizer state, and checkpoints hold the trainable params only (the base is read again
from train.init_from on resume).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
from flax import traverse_util

from moe.config import Config, LoRAConfig, QuantConfig
from moe.model import init_boxed
from moe.model.lora import is_adapter

ROUTER = ("moe", "gate")


def lora_of(cfg: Config) -> LoRAConfig | None:
    """The LoRA config the model is built with, or None for the plain model."""
    return cfg.lora if cfg.lora.rank is not None else None


def is_trainable(cfg: Config, path: tuple[str, ...]) -> bool:
    if cfg.lora.rank is None:
        return True
    return is_adapter(path) or (cfg.lora.train_router and path[-2:] == ROUTER)


def split(cfg: Config, params) -> tuple[dict, dict]:
    """(trainable, frozen) from the model's full params (adapters included for LoRA)."""
    flat = traverse_util.flatten_dict(params)
    if cfg.lora.rank is None:
        return params, (params if cfg.train.objective == "dpo" else {})
    trainable = {p: v for p, v in flat.items() if is_trainable(cfg, p)}
    frozen = {p: v for p, v in flat.items() if not is_adapter(p)}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def combine(cfg: Config, trainable, frozen):
    """The model's params: the trainable ones over the frozen base."""
    if cfg.lora.rank is None:
        return trainable
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)


def counts(cfg: Config) -> dict:
    """Parameter counts from shapes alone: trainable (adapters included), adapters, and the
    frozen base that has no gradients and no optimizer state (0 in a full fine-tune)."""
    boxed = jax.eval_shape(lambda: init_boxed(cfg.model, jax.random.key(0), lora_of(cfg)))
    full = traverse_util.flatten_dict(nn.unbox(boxed))
    size = {p: math.prod(v.shape) for p, v in full.items()}
    trainable = sum(n for p, n in size.items() if is_trainable(cfg, p))
    return {
        "trainable": trainable,
        "adapters": sum(n for p, n in size.items() if is_adapter(p)),
        "frozen": sum(size.values()) - trainable,
    }


def merged_config(cfg: Config) -> Config:
    """The config of a LoRA run's merged model: no adapters, no quantized base, nothing to
    start from, the language-model objective."""
    return dataclasses.replace(
        cfg,
        lora=LoRAConfig(),
        quant=QuantConfig(),
        train=dataclasses.replace(cfg.train, init_from=None, objective="lm"),
        data=dataclasses.replace(cfg.data, format="auto"),
    )
