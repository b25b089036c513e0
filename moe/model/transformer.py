"""The decoder: embedding -> n_layers x [attention, MLP or MoE] (nn.scan) -> norm -> logits.

Parameter tree (the checkpoint format; moe/convert maps it to Hugging Face names):
  embed/embedding            [vocab, d_model]
  layers/attn_norm/scale     [layers, d_model]
  layers/attn/{q,k,v}        [layers, d_model, heads | kv_heads, head_dim]
  layers/attn/o              [layers, heads, head_dim, d_model]
  layers/attn/{q,k}_norm/scale [layers, head_dim]                                      (qk_norm)
  layers/mlp_norm/scale      [layers, d_model]
  layers/mlp/{w1,w3}, w2     [layers, d_model, d_ff], [layers, d_ff, d_model]          (dense)
  layers/moe/gate            [layers, d_model, experts]                                 (MoE)
  layers/moe/{w1,w3}, w2     [layers, experts, d_model, d_ff], [layers, experts, d_ff, d_model]
  layers/moe/shared/{w1,w3}, w2  [layers, d_model, shared width], [layers, shared width, d_model]  (shared experts)
  layers/moe/bias            [layers, experts]                              (balance=bias; float32)
  final_norm/scale           [d_model]
  lm_head/kernel             [d_model, vocab]
With LoRA (moe/model/lora.py), each targeted weight W has W_lora_a and W_lora_b beside it.
Decoding on CPU (moe/infer/layout.py) takes the layers unstacked, layer_0 ... layer_{n-1},
each without the leading axis (layer_list=True; the cached path only).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe.config import ConfigError, LoRAConfig, ModelConfig
from moe.model import kv_cache
from moe.model.attention import Attention
from moe.model.layers import DTYPES, RMSNorm, SwiGLU, kernel_init, param_with_axes, rope_cos_sin
from moe.model.lora import DROPOUT_RNG
from moe.model.moe import SparseMoE
from moe.model.qarray import as_array
from moe.parallel import context
from moe.parallel import mesh as mesh_lib

ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderLayer(nn.Module):
    """One block. Without kv: (out, router stats); with this layer's cache kv: (out, (stats, kv))."""

    cfg: ModelConfig
    append: bool = False  # see Attention
    lora: LoRAConfig | None = None

    @nn.compact
    def __call__(self, x, cos, sin, attn, valid, select, kv=None):  # x: [batch, seq, d_model]
        cfg = self.cfg
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        normed = RMSNorm(cfg, name="attn_norm")(x)
        a = Attention(cfg, self.append, self.lora, name="attn")(normed, cos, sin, attn, kv, select)
        a, kv = a if kv is not None else (a, None)
        h = x + a
        normed = RMSNorm(cfg, name="mlp_norm")(h)
        if cfg.is_moe:
            y, stats = SparseMoE(cfg, self.lora, name="moe")(normed, valid, select)
        else:
            y, stats = SwiGLU(cfg, self.lora, name="mlp")(normed, select), {}
        out = nn.with_logical_constraint((h + y).astype(x.dtype), ACTIVATION_AXES)
        return out, (stats if kv is None else (stats, kv))


def _layer_stack(cfg: ModelConfig, cached: bool = False):
    """The layers as one nn.scan (parameters stacked on a leading "layers" axis); with
    `cached`, each layer also takes and returns its slice of the KV cache."""
    layer = DecoderLayer
    if cfg.remat != "none" and not cached:
        layer = nn.remat(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    return nn.scan(
        layer,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, DROPOUT_RNG: True},
        in_axes=(nn.broadcast,) * 5 + ((0,) if cached else ()),
        length=cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


class Embed(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens):  # [batch, seq] int
        cfg = self.cfg
        table = param_with_axes(
            self,
            "embedding",
            kernel_init(cfg),
            (cfg.vocab_size, cfg.d_model),
            ("vocab", "embed"),
            DTYPES[cfg.param_dtype],
        )
        return jnp.take(as_array(table), tokens, axis=0).astype(DTYPES[cfg.dtype])  # [batch, seq, d_model]


class LMHead(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):  # [batch, seq, d_model]
        cfg, dtype = self.cfg, DTYPES[self.cfg.dtype]
        kernel = param_with_axes(
            self, "kernel", kernel_init(cfg), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), DTYPES[cfg.param_dtype]
        )
        return (x.astype(dtype) @ as_array(kernel.astype(dtype))).astype(jnp.float32)  # [batch, seq, vocab]


class Transformer(nn.Module):
    """tokens [batch, seq] -> (float32 logits [batch, seq, vocab], per-layer router stats).

    positions [batch, seq] feed the rotary embedding (default 0..seq-1); segment_ids
    [batch, seq] mark packed documents (attention stays within a document; id 0 is
    padding and is left out of the router statistics). Attention masks by index within
    the row, so positions restarting per document change only the rotary angles.

    With a cache (moe/model/kv_cache.py), positions are required and absolute (-1 marks
    padding: not attended, not cached); the new tokens attend to the cache and are
    written into it, and the call returns (logits, stats, updated cache).

    adapter_select [batch, rank] (0/1): with several adapters stacked along the rank
    (moe/serve/adapters.py), the columns each row uses; None: every column (one adapter).
    """

    cfg: ModelConfig
    lora: LoRAConfig | None = None  # adapters (moe/model/lora.py); None: the plain model
    head: bool = True  # False: return the final-norm hidden states [batch, seq, d_model] instead of logits
    layer_list: bool = False  # True: params hold layer_0... (not a stacked "layers"); with a cache only

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, adapter_select=None):
        cfg = self.cfg
        batch, seq = tokens.shape
        x = Embed(cfg, name="embed")(tokens)
        if cache is not None:
            return self._cached(x, positions, cache, adapter_select)
        index = jnp.arange(seq)[None]  # [1, seq]
        if positions is None:
            positions = jnp.broadcast_to(index, (batch, seq))
        cos, sin = rope_cos_sin(positions, cfg.resolved_head_dim, cfg.rope_theta)
        attn = {"q_pos": index, "k_pos": index}
        if segment_ids is not None:
            attn.update(q_seg=segment_ids, k_seg=segment_ids)
        valid = jnp.ones((batch, seq), bool) if segment_ids is None else segment_ids != 0
        layers = _layer_stack(cfg)(cfg, lora=self.lora, name="layers")
        x, stats = layers(x, cos, sin, attn, valid, adapter_select)
        x = RMSNorm(cfg, name="final_norm")(x)
        return (LMHead(cfg, name="lm_head")(x) if self.head else x), stats

    def _cached(self, x, positions, cache, select):
        cfg = self.cfg
        if context.size(mesh_lib.active_mesh()) > 1:
            raise ConfigError(
                "a decoding cache holds whole sequences: decode under a mesh with mesh.context=1 "
                "(context parallelism is for training and scoring)"
            )
        attn, new_pos, new_end, append = kv_cache.plan_write(cache, positions, cfg.sliding_window)
        cos, sin = rope_cos_sin(jnp.maximum(positions, 0), cfg.resolved_head_dim, cfg.rope_theta)
        valid = positions >= 0
        if self.layer_list:  # the cache's k and v are per-layer sequences too (kv_cache.as_layer_list)
            outs = []
            for i in range(cfg.n_layers):
                layer = DecoderLayer(cfg, append, self.lora, name=f"layer_{i}")
                x, out = layer(x, cos, sin, attn, valid, select, {"k": cache["k"][i], "v": cache["v"][i]})
                outs.append(out)
            stats = jax.tree_util.tree_map(lambda *s: jnp.stack(s), *[s for s, _ in outs])
            kv = {name: tuple(layer_kv[name] for _, layer_kv in outs) for name in ("k", "v")}
        else:
            layers = _layer_stack(cfg, cached=True)(cfg, append, self.lora, name="layers")
            x, (stats, kv) = layers(x, cos, sin, attn, valid, select, {"k": cache["k"], "v": cache["v"]})
        x = RMSNorm(cfg, name="final_norm")(x)
        out = LMHead(cfg, name="lm_head")(x) if self.head else x
        return out, stats, {**kv, "pos": new_pos, "end": new_end}
