"""The training objectives' shared pieces and the language-modelling loss.

Every objective runs the model through `forward` (the trainable params over the frozen
ones) and returns sums over its batch, so micro-batches add up to the whole batch exactly:
    lm  (pretraining and chat SFT): cross-entropy over the loss mask (`lm_terms`)
    dpo (preference pairs): moe/training/dpo.py
plus the router statistics the MoE balancing and z losses are computed from.
"""

from __future__ import annotations

import jax.numpy as jnp

import moe.model as model_lib
from moe.config import Config
from moe.training import trainable as trainable_lib
from moe.training.loss import default_chunk, fused_nll_sum, token_nll


def loss_mask(batch):
    """[batch, seq] float32: the positions whose targets count (chat data: assistant tokens)."""
    mask = batch["loss_mask"] if "loss_mask" in batch else batch["segment_ids"] != 0
    return mask.astype(jnp.float32)


def forward(cfg: Config, params, batch, frozen=None, rng=None, head: bool = True):
    """(logits, router stats) of the model (trainable params over the frozen ones); with
    head=False the final-norm hidden states instead of logits."""
    full = trainable_lib.combine(cfg, params, frozen)
    return model_lib.apply(
        cfg.model,
        full,
        batch["inputs"],
        batch["positions"],
        batch["segment_ids"],
        trainable_lib.lora_of(cfg),
        rng,
        head=head,
    )


def router_terms(cfg: Config, stats) -> dict:
    if not cfg.model.is_moe:
        return {}
    return dict(
        expert_counts=stats["expert_counts"],
        prob_sum=stats["prob_sum"],
        z_sum=stats["z_sum"],
        router_rows=stats["n_tokens"],
        ep_overflow=jnp.sum(stats["ep_overflow"]),
    )


def lm_terms(cfg: Config, params, batch, frozen=None, rng=None) -> dict:
    """Sums over one (micro-)batch for next-token prediction (pretraining; chat SFT, whose
    loss mask keeps the assistant tokens only): loss_sum (what the step minimizes, before
    normalizing), ce_sum, n_tokens and the router statistics."""
    mask = loss_mask(batch)
    if cfg.train.fused_loss:
        hidden, stats = forward(cfg, params, batch, frozen, rng, head=False)
        kernel = model_lib.lm_head_kernel(cfg.model, trainable_lib.combine(cfg, params, frozen))
        chunk = cfg.train.loss_chunk or default_chunk(hidden.shape[1])
        ce_sum = fused_nll_sum(hidden, kernel, batch["targets"], mask, chunk)
    else:
        logits, stats = forward(cfg, params, batch, frozen, rng)
        ce_sum = jnp.sum(token_nll(logits, batch["targets"]) * mask)
    return {"loss_sum": ce_sum, "ce_sum": ce_sum, "n_tokens": jnp.sum(mask), **router_terms(cfg, stats)}
