"""Choosing the next token from float32 logits: greedy, temperature, top-k, top-p.

Filters return logits with the removed tokens at -inf, so they compose (top-k, then top-p,
as Hugging Face applies them) and a categorical draw never picks a removed token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


class SamplingError(ValueError):
    """Sampling settings that cannot be used; the message says which and the valid range."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p

    def __post_init__(self):
        if not self.temperature >= 0:
            raise SamplingError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise SamplingError(f"top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SamplingError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def top_k_filter(logits_bv, k: int):
    """Keep the k largest logits per row (ties at the k-th value kept too)."""
    k = min(k, logits_bv.shape[-1])
    kth = jax.lax.top_k(logits_bv, k)[0][..., -1:]  # [batch, 1]
    return jnp.where(logits_bv >= kth, logits_bv, -jnp.inf)


def top_p_filter(logits_bv, p: float):
    """Keep the most likely tokens until their probability reaches p: a token stays when the
    probability of the tokens ranked above it is below p (so the top token always stays)."""
    order = jnp.argsort(-logits_bv, axis=-1)
    sorted_logits = jnp.take_along_axis(logits_bv, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits_bv.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits_bv, -jnp.inf)


def sample(logits_bv, sampling: Sampling, keys_b):
    """Next tokens [batch] int32 from logits [batch, vocab]; keys_b: one PRNG key per row."""
    if sampling.greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv.astype(jnp.float32) / sampling.temperature
    if sampling.top_k is not None:
        logits_bv = top_k_filter(logits_bv, sampling.top_k)
    if sampling.top_p is not None:
        logits_bv = top_p_filter(logits_bv, sampling.top_p)
    return jax.vmap(jax.random.categorical)(keys_b, logits_bv).astype(jnp.int32)
