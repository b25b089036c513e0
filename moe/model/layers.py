"""Small building blocks: RMSNorm, rotary embedding (Hugging Face half layout), SwiGLU MLP.

Every parameter is created with logical axis names (see moe/parallel/mesh.py for the mapping
to mesh axes). Kernels are stored input-dimension first: y = x @ W.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe.config import LoRAConfig, ModelConfig
from moe.model.experts import ExpertList
from moe.model.lora import adapt, project
from moe.model.qarray import QArray

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def param_with_axes(module: nn.Module, name: str, init, shape, axes, dtype):
    """A parameter annotated with logical axis names, one per dimension. A weight stored
    quantized (moe/quant) comes back as its QArray, dequantized where it is used; experts
    held as separate buffers (moe/model/experts.py) as their ExpertList."""
    assert len(shape) == len(axes), (name, shape, axes)
    if module.has_variable("params", name):
        stored = module.get_variable("params", name)
        if isinstance(stored, (QArray, ExpertList)):  # flax's own shape check would compare a leaf's shape
            if tuple(stored.shape) != tuple(shape):
                raise ValueError(
                    f"{module.path}/{name}: stored weight of shape {stored.shape}, the model expects {tuple(shape)}"
                )
            return stored
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def kernel_init(cfg: ModelConfig):
    return nn.initializers.normal(stddev=cfg.init_std)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back to the input dtype, times the weight."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):  # [..., d_model]
        scale = param_with_axes(
            self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",), DTYPES[self.cfg.param_dtype]
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        return y.astype(x.dtype) * scale.astype(x.dtype)


def rope_cos_sin(positions, head_dim: int, theta: float):
    """cos and sin of shape [batch, seq, head_dim] for the half layout, in float32."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [head_dim/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [batch, seq, head_dim]
    return jnp.cos(angles), jnp.sin(angles)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _over_heads(x, cos, sin):
    """cos and sin [batch, seq, head_dim] as [batch, seq, 1, head_dim] in x's dtype."""
    return cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)


@jax.custom_vjp
def apply_rope(x, cos, sin):
    """Rotate pairs (x[i], x[i + d/2]): x * cos + rotate_half(x) * sin.

    x: [batch, seq, heads, head_dim]; cos, sin: [batch, seq, head_dim] (float32, taken as
    constants: no gradient flows to them). The backward pass is the rotation's transpose,
    dy * cos - rotate_half(dy * sin), one concatenation (JAX's own builds zero-padded
    halves and adds them)."""
    cos, sin = _over_heads(x, cos, sin)
    return x * cos + _rotate_half(x) * sin


def _rope_fwd(x, cos, sin):
    return apply_rope(x, cos, sin), (cos, sin)


def _rope_bwd(residuals, dy):
    cos, sin = _over_heads(dy, *residuals)
    return dy * cos - _rotate_half(dy * sin), None, None


apply_rope.defvjp(_rope_fwd, _rope_bwd)


@jax.custom_vjp
def gated(gate, up):
    """silu(gate) * up, the SwiGLU product. Its backward keeps only gate and up and
    recomputes the sigmoid, where JAX's own would save sigmoid(gate) and silu(gate) too:
    per MoE layer of bench-moe that is two [tokens x top_k, d_ff] float32 arrays fewer
    stacked by the layer scan. Compiled, value and gradients equal JAX's to the bit."""
    return nn.silu(gate) * up


def _gated_fwd(gate, up):
    return gated(gate, up), (gate, up)


def _gated_bwd(residuals, g):
    gate, up = residuals
    sig = jax.nn.sigmoid(gate)
    g_up = g * up  # the operations of JAX's derivative of silu(gate) * up, in its order
    return g_up * sig + (gate * g_up) * (sig * (1 - sig)), (gate * sig) * g


gated.defvjp(_gated_fwd, _gated_bwd)


def gated_down(down, gate, up, w2, recompute: bool = True):
    """down(gated(gate, up), w2), the SwiGLU's last product. With `recompute` the gated
    product is recomputed in the backward pass from gate and up (which gated's backward
    keeps anyway) instead of saved for w2's weight gradient: one [tokens, d_ff] array fewer
    per layer, stacked by the layer scan for every layer. XLA drops the recomputed product
    with w2, whose value the backward does not use. It saves memory and time on CPU
    (benchmarks/README.md has the measurements).

    Callers pass recompute=False where the layer is rematerialized (`model.remat` full or
    save_dots): nothing of it is saved there anyway. prevent_cse=False: the layers run in a
    scan, where JAX needs no barrier (with one, the 8x7B v5p-128 plan grew by 0.13 GiB per
    chip when it recomputed inside a rematerialized layer)."""
    if not recompute:
        return down(gated(gate, up), w2)
    return jax.checkpoint(
        lambda g, u, w: down(gated(g, u), w), policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False
    )(gate, up, w2)


class SwiGLU(nn.Module):
    """Dense MLP: w2(silu(x @ w1) * (x @ w3)); w1 = gate, w3 = up, w2 = down."""

    cfg: ModelConfig
    lora: LoRAConfig | None = None

    @nn.compact
    def __call__(self, x, select=None):  # x: [batch, seq, d_model]; select: [batch, rank] (lora.py)
        cfg, dtype = self.cfg, DTYPES[self.cfg.dtype]
        pdt, init = DTYPES[cfg.param_dtype], kernel_init(cfg)
        select = None if select is None else select[:, None, :]

        def weight(name, shape, axes):
            w = param_with_axes(self, name, init, shape, axes, pdt)
            return adapt(self, name, w, self.lora, n_lead=0, n_in=1, axes=axes, dtype=pdt, select=select).astype(dtype)

        w1 = weight("w1", (cfg.d_model, cfg.d_ff), ("embed", "mlp"))
        w3 = weight("w3", (cfg.d_model, cfg.d_ff), ("embed", "mlp"))
        w2 = weight("w2", (cfg.d_ff, cfg.d_model), ("mlp", "embed"))
        x = x.astype(dtype)
        down = lambda h, w: project(h, w, 1)  # h [batch, seq, d_ff]
        return gated_down(down, project(x, w1, 1), project(x, w3, 1), w2, cfg.recompute_gated)
