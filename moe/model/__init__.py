"""The model as functional Flax linen modules, plus thin init/apply helpers.

params = moe.model.init(cfg, jax.random.key(0))            # plain nested dict
logits = moe.model.logits(cfg, params, token_ids)           # float32 [batch, seq, vocab]
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe.config import LoRAConfig, ModelConfig
from moe.model.layers import DTYPES
from moe.model.qarray import as_array
from moe.model.transformer import Transformer


def init_boxed(cfg: ModelConfig, rng, lora: LoRAConfig | None = None):
    """Params with their logical-axis metadata (nn.Partitioned leaves); with `lora`, the
    adapters of its targets too."""
    return Transformer(cfg, lora).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


@functools.partial(jax.jit, static_argnums=0)
def init(cfg: ModelConfig, rng):
    """Plain params: a nested dict of arrays (compiled, so large models initialize fast)."""
    return nn.unbox(init_boxed(cfg, rng))


def param_shapes(cfg: ModelConfig):
    """ShapeDtypeStructs of every parameter, computed without allocating any weight."""
    return nn.unbox(jax.eval_shape(lambda: init_boxed(cfg, jax.random.key(0))))


def logical_axes(cfg: ModelConfig, lora: LoRAConfig | None = None):
    """The logical axis names of every parameter, as a tree of PartitionSpecs."""
    boxed = jax.eval_shape(lambda: init_boxed(cfg, jax.random.key(0), lora))
    return nn.get_partition_spec(boxed)


def apply(
    cfg: ModelConfig,
    params,
    tokens,
    positions=None,
    segment_ids=None,
    lora: LoRAConfig | None = None,
    dropout_rng=None,
    head: bool = True,
):
    """(float32 logits [batch, seq, vocab], router stats stacked per layer). With `lora`,
    params hold the adapters too; dropout_rng turns on lora.dropout (training). head=False:
    the final-norm hidden states [batch, seq, d_model] instead of logits (moe/training/loss.py takes
    them with lm_head_kernel)."""
    rngs = {} if dropout_rng is None else {"lora_dropout": dropout_rng}
    return Transformer(cfg, lora, head).apply({"params": params}, tokens, positions, segment_ids, rngs=rngs)


def lm_head_kernel(cfg: ModelConfig, params):
    """The lm_head kernel [d_model, vocab] as LMHead multiplies by it: in the compute dtype,
    a quantized one decoded (the fused training loss, moe/training/loss.py, takes it so)."""
    return as_array(params["lm_head"]["kernel"].astype(DTYPES[cfg.dtype]))


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg: ModelConfig, params, token_ids):
    return apply(cfg, params, token_ids)[0]


def logits(cfg: ModelConfig, params, token_ids):
    """float32 logits [batch, seq, vocab] for int token ids [batch, seq] (jit-compiled)."""
    return _logits(cfg, params, jnp.asarray(token_ids, jnp.int32))
