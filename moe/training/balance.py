"""Auxiliary-loss-free balancing (model.balance=bias; DeepSeek-V3, Wang et al. 2024).

Each MoE layer holds a bias [experts] that is added to the router scores for the top-k
choice only (moe/model/moe.py). After every optimizer step the bias moves by

    bias[layer, e] += bias_update_rate * sign(mean load of the layer - load of e)

where an expert's load is its routed token copies over the whole global batch: the counts
the step already sums over every micro-batch (grad_accum) and every device (data, fsdp and
expert parallelism), so the update is the same whatever the mesh. An overloaded expert
is chosen less often at the next step, an idle one more, and no loss term pulls on the
router's weights. The bias is a parameter with no gradient (the choice is not
differentiable) and no weight decay, so the optimizer never moves it; it is saved and
restored with the params, and resumes exactly.
"""

from __future__ import annotations

import jax.numpy as jnp

from moe.config import ModelConfig


def has_bias(params) -> bool:
    """True when the (trainable) params hold the MoE layers' balancing bias."""
    return "bias" in params.get("layers", {}).get("moe", {})


def updated_bias(bias_le, counts_le, rate: float):
    """bias [layers, experts] moved by rate x sign(mean count - count) per layer; counts
    [layers, experts] are the global batch's routed copies. Compared as n_experts x count
    against the layer's total, which is exact in float32 for counts below 2^24 / n_experts."""
    n_experts = counts_le.shape[-1]
    total_l = jnp.sum(counts_le, axis=-1, keepdims=True)
    return bias_le + rate * jnp.sign(total_l - n_experts * counts_le).astype(bias_le.dtype)


def update(cfg: ModelConfig, params, counts_le, moved=True):
    """params with every layer's bias moved after a step (params unchanged when there is
    none). moved: False (a traced bool) keeps the bias, as for a step the optimizer skipped."""
    if cfg.balance != "bias" or not has_bias(params):
        return params
    moe = params["layers"]["moe"]
    bias = jnp.where(moved, updated_bias(moe["bias"], counts_le, cfg.bias_update_rate), moe["bias"])
    return {**params, "layers": {**params["layers"], "moe": {**moe, "bias": bias}}}
