"""Next-token cross-entropy: the plain formula, and the lm_head fused with it for training.

`token_nll` is the reference: log_softmax of whole float32 logits, differentiated by JAX.

`fused_nll_sum` takes the final-norm hidden states and the lm_head kernel instead of
logits and works through blocks of `chunk` positions. Its forward rule under
differentiation computes the gradient in the same pass: per block the logits, their
log-sum-exp, (softmax - onehot) x weight, then that block's hidden-state gradient and its
share of the kernel gradient. So the [tokens, vocab] float32 logits never exist whole, the
softmax is exponentiated once, there is no scatter for the target's gradient and no
transposed copy of the logits' gradient, and the backward only scales by the incoming
cotangent. Without differentiation (eval) only the loss is computed. Same value and
gradients as `token_nll` after the same matmul, to float32 rounding (tests/test_loss.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# positions per block when train.loss_chunk is None: the largest divisor of seq_len up to this
DEFAULT_CHUNK = 128


def token_nll(logits, targets):
    """-log p(target) per position: float32 logits [batch, seq, vocab], targets [batch, seq]."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def default_chunk(seq_len: int) -> int:
    return max(c for c in range(1, min(seq_len, DEFAULT_CHUNK) + 1) if seq_len % c == 0)


def _blocks(a, chunk: int):
    """[batch, seq, ...] -> [seq // chunk, batch, chunk, ...]"""
    batch, seq = a.shape[:2]
    return jnp.moveaxis(a.reshape(batch, seq // chunk, chunk, *a.shape[2:]), 1, 0)


def _blocked_inputs(hidden, targets, weights, chunk: int):
    return _blocks(hidden, chunk), _blocks(targets, chunk), _blocks(weights, chunk)


def _unblocks(a):
    """[seq // chunk, batch, chunk, ...] -> [batch, seq, ...]"""
    n, batch, chunk = a.shape[:3]
    return jnp.moveaxis(a, 0, 1).reshape(batch, n * chunk, *a.shape[3:])


def _block_nll(hidden_bcd, kernel_dv, targets_bc):
    """(float32 logits [batch, chunk, vocab], log-sum-exp and -log p(target) [batch, chunk]),
    the logits computed as LMHead does: in the kernel's (compute) dtype, then float32."""
    logits = (hidden_bcd.astype(kernel_dv.dtype) @ kernel_dv).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return logits, lse, lse - jnp.take_along_axis(logits, targets_bc[..., None], axis=-1)[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def fused_nll_sum(hidden, kernel, targets, weights, chunk: int):
    """sum(-log p(target) * weights) with logits = hidden @ kernel, in blocks of `chunk`
    positions. hidden [batch, seq, d_model]; kernel [d_model, vocab] in the compute dtype;
    targets [batch, seq] int; weights [batch, seq] float32 (the loss mask)."""

    def block(total, xs):
        hidden_bcd, targets_bc, weights_bc = xs
        return total + jnp.sum(_block_nll(hidden_bcd, kernel, targets_bc)[2] * weights_bc), None

    return jax.lax.scan(block, jnp.zeros((), jnp.float32), _blocked_inputs(hidden, targets, weights, chunk))[0]


def _fused_fwd(hidden, kernel, targets, weights, chunk: int):
    vocab = kernel.shape[-1]

    def block(dkernel_dv, xs):
        hidden_bcd, targets_bc, weights_bc = xs
        logits, lse, nll = _block_nll(hidden_bcd, kernel, targets_bc)
        onehot = jnp.arange(vocab) == targets_bc[..., None]
        dlogits = ((jnp.exp(logits - lse[..., None]) - onehot) * weights_bc[..., None]).astype(kernel.dtype)
        dhidden = (dlogits @ kernel.T).astype(hidden.dtype)  # [batch, chunk, d_model]
        dkernel_dv += jnp.einsum(
            "bcd,bcv->dv", hidden_bcd.astype(kernel.dtype), dlogits, preferred_element_type=jnp.float32
        )
        return dkernel_dv, (nll, dhidden)

    xs = _blocked_inputs(hidden, targets, weights, chunk)
    dkernel, (nll, dhidden) = jax.lax.scan(block, jnp.zeros(kernel.shape, jnp.float32), xs)
    nll = _unblocks(nll)  # [batch, seq]
    return jnp.sum(nll * weights), (_unblocks(dhidden), dkernel.astype(kernel.dtype), nll, targets)


def _fused_bwd(chunk, residuals, g):
    del chunk
    dhidden, dkernel, nll, targets = residuals
    dtargets = jnp.zeros(targets.shape, jax.dtypes.float0)
    return (g * dhidden).astype(dhidden.dtype), (g * dkernel).astype(dkernel.dtype), dtargets, g * nll


fused_nll_sum.defvjp(_fused_fwd, _fused_bwd)
