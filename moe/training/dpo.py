"""Direct preference optimization (Rafailov et al. 2023), with conservative label smoothing.

For a prompt x with a chosen answer y_w and a rejected one y_l, the policy pi and the frozen
reference pi_ref (the starting model: the LoRA base with its adapters off, or a frozen copy
when every weight trains):

    z    = beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))]
    loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)       eps = dpo.label_smoothing

log pi(y|x) sums the answer's token log-probabilities (its loss mask: the last assistant turn
and its eos). Batches hold [pairs, 2, seq] arrays (chosen, rejected); the MoE balancing and
z losses stay on, over the policy's forward pass of both answers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import moe.model as model_lib
from moe.config import Config
from moe.training.loss import token_nll
from moe.training.objectives import forward, loss_mask, router_terms


def flat_pairs(batch: dict) -> dict:
    """[pairs, 2, seq] -> [2 * pairs, seq]: chosen and rejected rows alternate."""
    return {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}


def sequence_logp(logits, batch: dict):
    """[rows]: the sum of log p(target) over each row's loss mask."""
    return -jnp.sum(token_nll(logits, batch["targets"]) * loss_mask(batch), axis=-1)


def pair_loss(policy_c, policy_r, ref_c, ref_r, beta: float, label_smoothing: float = 0.0):
    """(loss, chosen reward, rejected reward), each [pairs], from sequence log-probs [pairs]."""
    reward_c, reward_r = beta * (policy_c - ref_c), beta * (policy_r - ref_r)
    z = reward_c - reward_r
    loss = -(1 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
    return loss, reward_c, reward_r


def terms(cfg: Config, params, frozen, batch: dict, rng=None) -> dict:
    """Sums over a batch of pairs (train.loss_terms for train.objective=dpo)."""
    flat = flat_pairs(batch)
    logits, stats = forward(cfg, params, flat, frozen, rng)
    policy = sequence_logp(logits, flat).reshape(-1, 2)  # [pairs, (chosen, rejected)]
    ref_logits, _ = model_lib.apply(cfg.model, frozen, flat["inputs"], flat["positions"], flat["segment_ids"])
    ref = jax.lax.stop_gradient(sequence_logp(ref_logits, flat)).reshape(-1, 2)
    loss, reward_c, reward_r = pair_loss(
        policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], cfg.dpo.beta, cfg.dpo.label_smoothing
    )
    chosen_tokens = jnp.sum(loss_mask(flat).reshape(-1, 2, flat["targets"].shape[-1])[:, 0])
    return {
        "loss_sum": jnp.sum(loss),
        "ce_sum": -jnp.sum(policy[:, 0]),
        "n_tokens": chosen_tokens,
        "dpo_loss": jnp.sum(loss),
        "reward_margin": jnp.sum(reward_c - reward_r),
        "reward_accuracy": jnp.sum((reward_c > reward_r).astype(jnp.float32)),
        "logp_chosen": jnp.sum(policy[:, 0]),
        "logp_rejected": jnp.sum(policy[:, 1]),
        **router_terms(cfg, stats),
    }
