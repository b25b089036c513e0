"""The training step: loss, optimizer, a jit-compiled step with gradient accumulation.

loss = cross-entropy (next token, padding excluded)
     + aux_loss_coef * load-balancing loss (Switch / Mixtral, over all layers' rows)
     + z_loss_coef   * router z-loss (ST-MoE)
Each term is reported apart. A step whose gradients are not finite changes nothing
(optax.apply_if_finite) and is counted; the loop stops after too many in a row.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn
import optax

import moe.model as model_lib
from moe.config import Config
from moe.model.moe import load_balancing_loss, z_loss


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken (skipped ones included)
    params: Any
    opt_state: Any


# ----------------------------------------------------------------------------- optimizer


def learning_rate(cfg: Config):
    t = cfg.train
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
        decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.lr * t.min_lr_ratio)


def _path_names(path) -> tuple[str, ...]:
    return tuple(getattr(k, "key", str(k)) for k in path)


def decay_mask(params):
    """True where weight decay applies: every weight but the norm scales."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _path_names(p)[-1] != "scale", params)


def router_labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if _path_names(p)[-2:] == ("moe", "gate") else "trained", params)


def make_optimizer(cfg: Config, params) -> optax.GradientTransformation:
    t = cfg.train
    adamw = optax.chain(
        optax.clip_by_global_norm(t.clip_norm) if t.clip_norm > 0 else optax.identity(),
        optax.adamw(learning_rate(cfg), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                    mask=decay_mask),
    )
    if t.freeze_router and cfg.model.is_moe:
        adamw = optax.multi_transform({"trained": adamw, "frozen": optax.set_to_zero()}, router_labels(params))
    # Non-finite gradients: skip the update, count it. The loop enforces the limit.
    return optax.apply_if_finite(adamw, max_consecutive_errors=2**30)


def nonfinite_counts(opt_state) -> tuple[jax.Array, jax.Array]:
    """(consecutive, total) skipped steps, from optax.apply_if_finite's state."""
    return opt_state.notfinite_count, opt_state.total_notfinite


def fresh_state(cfg: Config, rng) -> TrainState:
    params = nn.unbox(model_lib.init_boxed(cfg.model, rng))
    opt_state = make_optimizer(cfg, params).init(params)
    return TrainState(jnp.zeros((), jnp.int32), params, opt_state)


init_state = jax.jit(fresh_state, static_argnums=0)


# ----------------------------------------------------------------------------- loss


def loss_terms(cfg: Config, params, batch) -> dict:
    """Sums over one (micro-)batch: ce_sum, n_tokens, and the router statistics."""
    logits, stats = model_lib.apply(cfg.model, params, batch["inputs"], batch["positions"], batch["segment_ids"])
    mask = (batch["segment_ids"] != 0).astype(jnp.float32)  # [batch, seq]
    logp = jax.nn.log_softmax(logits, axis=-1)  # float32 [batch, seq, vocab]
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    terms = {"ce_sum": jnp.sum(nll * mask), "n_tokens": jnp.sum(mask)}
    if cfg.model.is_moe:
        terms.update(expert_counts=stats["expert_counts"], prob_sum=stats["prob_sum"],
                     z_sum=stats["z_sum"], router_rows=stats["n_tokens"])
    return terms


def combine(cfg: Config, terms: dict, total_tokens) -> tuple[jax.Array, dict]:
    """(loss to differentiate, metrics) from summed terms; ce is normalized by total_tokens."""
    ce = terms["ce_sum"] / jnp.maximum(total_tokens, 1.0)
    metrics = {"ce_loss": ce}
    loss = ce
    if cfg.model.is_moe:
        rows = jnp.sum(terms["router_rows"])
        aux = load_balancing_loss(terms["expert_counts"], terms["prob_sum"], rows)
        z = z_loss(terms["z_sum"], rows)
        loss = loss + cfg.train.aux_loss_coef * aux + cfg.train.z_loss_coef * z
        per_layer_rows = jnp.maximum(terms["router_rows"], 1.0)[:, None] * cfg.model.top_k
        metrics.update(aux_loss=aux, z_loss=z, expert_load=terms["expert_counts"] / per_layer_rows)
    else:
        metrics.update(aux_loss=jnp.zeros(()), z_loss=jnp.zeros(()))
    return loss, metrics


# ----------------------------------------------------------------------------- steps


def _micro_batches(batch: dict, n: int) -> dict:
    return jax.tree_util.tree_map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def grads_and_metrics(cfg: Config, params, batch):
    """Gradients of the loss over the whole batch, accumulated over grad_accum micro-batches.

    Cross-entropy is normalized by the tokens of the whole batch, so accumulation matches
    one big batch exactly; the router losses are taken per micro-batch and averaged.
    """
    n_micro = cfg.train.grad_accum
    total_tokens = jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32)

    def micro_loss(p, micro):
        terms = loss_terms(cfg, p, micro)
        loss, metrics = combine(cfg, terms, total_tokens)
        if n_micro > 1:  # router losses averaged over micro-batches; ce already global
            loss = metrics["ce_loss"] + (loss - metrics["ce_loss"]) / n_micro
        return loss, metrics

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if n_micro == 1:
        (loss, metrics), grads = grad_fn(params, batch)
        return loss, grads, metrics

    def body(carry, micro):
        loss_acc, grads_acc, metrics_acc = carry
        (loss, metrics), grads = grad_fn(params, micro)
        add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)
        return (loss_acc + loss, add(grads_acc, grads), add(metrics_acc, metrics)), None

    micro = _micro_batches(batch, n_micro)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, first)))
    (_, zero_metrics), zero_grads = zeros
    (loss, grads, metrics), _ = jax.lax.scan(body, (jnp.zeros(()), zero_grads, zero_metrics), micro)
    router = {k: v / n_micro for k, v in metrics.items() if k != "ce_loss"}
    return loss, grads, {**metrics, **router}


def train_step(cfg: Config, optimizer: optax.GradientTransformation, state: TrainState, batch):
    loss, grads, metrics = grads_and_metrics(cfg, state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    consecutive, total = nonfinite_counts(opt_state)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), lr=learning_rate(cfg)(state.step),
                   nonfinite_consecutive=consecutive, nonfinite_total=total)
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(cfg: Config, params, batch) -> dict:
    terms = loss_terms(cfg, params, batch)
    return {"ce_sum": terms["ce_sum"], "n_tokens": terms["n_tokens"]}


def _with_rules(cfg: Config, fn):
    """Trace `fn` with the logical-axis rules of cfg.mesh.rules active."""
    from moe.sharding import rules

    @functools.wraps(fn)
    def wrapped(*args):
        with nn.logical_axis_rules(rules(cfg)):
            return fn(*args)
    return wrapped


def jit_steps(cfg: Config, optimizer, mesh=None, state_sharding=None):
    """(train_step, eval_step), compiled; the train step donates the old state. With a
    mesh, call them inside `jax.set_mesh(mesh)`; batches are split over the batch axes."""
    train_fn = _with_rules(cfg, functools.partial(train_step, cfg, optimizer))
    eval_fn = _with_rules(cfg, functools.partial(eval_step, cfg))
    if mesh is None:
        return jax.jit(train_fn, donate_argnums=0), jax.jit(eval_fn)
    from moe.sharding import batch_sharding, replicated

    batch, rep = batch_sharding(mesh), replicated(mesh)
    train = jax.jit(train_fn, donate_argnums=0, in_shardings=(state_sharding, batch),
                    out_shardings=(state_sharding, rep))
    evaluate = jax.jit(eval_fn, in_shardings=(state_sharding.params, batch), out_shardings=rep)
    return train, evaluate


def flops_per_token(cfg: Config, active_params: int) -> float:
    """Training FLOPs per token: 6 x active matmul params + attention scores and values."""
    m = cfg.model
    matmul_params = active_params - m.vocab_size * m.d_model  # the embedding lookup is free
    attention = 12 * m.n_layers * cfg.train.seq_len * m.n_heads * m.resolved_head_dim
    return 6.0 * matmul_params + attention
