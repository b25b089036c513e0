"""The training step: loss, optimizer, a jit-compiled step with gradient accumulation.

loss = cross-entropy (next token; padding, and with chat data every non-assistant token,
       excluded) or the DPO loss (moe/training/dpo.py)
     + aux_loss_coef * load-balancing loss (Switch / Mixtral, over all layers' rows)
     + z_loss_coef   * router z-loss (ST-MoE)
Each term is reported apart. A step whose gradients are not finite changes nothing
(optax.apply_if_finite) and is counted; the loop stops after too many in a row.

The state's params are the trainable ones (moe/training/trainable.py); the frozen rest (a LoRA
base, DPO's reference) is an argument of the step, never differentiated or updated.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import moe.model as model_lib
from moe.config import Config
from moe.model.moe import load_balancing_loss, z_loss
from moe.parallel.mesh import batch_sharding, replicated, rules
from moe.training import balance, dpo, objectives
from moe.training import trainable as trainable_lib
from moe.training.metrics import DPO_METRICS
from moe.training.objectives import forward, loss_mask


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken (skipped ones included)
    params: Any
    opt_state: Any


# ----------------------------------------------------------------------------- optimizer


def learning_rate(cfg: Config):
    t = cfg.train
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=t.lr,
        warmup_steps=t.warmup_steps,
        decay_steps=max(t.steps, t.warmup_steps + 1),
        end_value=t.lr * t.min_lr_ratio,
    )


def _path_names(path) -> tuple[str, ...]:
    return tuple(getattr(k, "key", str(k)) for k in path)


def decay_mask(params):
    """True where weight decay applies: every weight but the norm scales and the balancing
    bias (which has no gradient either, so the optimizer leaves it as it is)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _path_names(p)[-1] not in ("scale", "bias"), params)


def router_labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if _path_names(p)[-2:] == ("moe", "gate") else "trained", params
    )


def make_optimizer(cfg: Config, params) -> optax.GradientTransformation:
    t = cfg.train
    adamw = optax.chain(
        optax.clip_by_global_norm(t.clip_norm) if t.clip_norm > 0 else optax.identity(),
        optax.adamw(learning_rate(cfg), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask),
    )
    if t.freeze_router and cfg.model.is_moe:
        adamw = optax.multi_transform({"trained": adamw, "frozen": optax.set_to_zero()}, router_labels(params))
    # Non-finite gradients: skip the update, count it. The loop enforces the limit.
    return optax.apply_if_finite(adamw, max_consecutive_errors=2**30)


def nonfinite_counts(opt_state) -> tuple[jax.Array, jax.Array]:
    """(consecutive, total) skipped steps, from optax.apply_if_finite's state."""
    return opt_state.notfinite_count, opt_state.total_notfinite


def fresh_params(cfg: Config, rng):
    """The model's params (with the adapters, for LoRA), freshly initialized."""
    return nn.unbox(model_lib.init_boxed(cfg.model, rng, trainable_lib.lora_of(cfg)))


def state_from(cfg: Config, trainable) -> TrainState:
    """Step 0 with these trainable params and a fresh optimizer."""
    return TrainState(jnp.zeros((), jnp.int32), trainable, make_optimizer(cfg, trainable).init(trainable))


def fresh_state(cfg: Config, rng) -> TrainState:
    return state_from(cfg, trainable_lib.split(cfg, fresh_params(cfg, rng))[0])


init_state = jax.jit(fresh_state, static_argnums=0)


# ----------------------------------------------------------------------------- loss


def loss_terms(cfg: Config, params, batch, frozen=None, rng=None) -> dict:
    """Sums over one (micro-)batch of the configured objective (train.objective): loss_sum
    (what the step minimizes, before normalizing), ce_sum, n_tokens, the router statistics,
    and for DPO its own sums."""
    if cfg.train.objective == "dpo":
        return dpo.terms(cfg, params, frozen, batch, rng)
    return objectives.lm_terms(cfg, params, batch, frozen, rng)


def normalizer(cfg: Config, batch):
    """What the loss sum is divided by: the counted tokens (lm) or the pairs (dpo)."""
    if cfg.train.objective == "dpo":
        return jnp.float32(batch["inputs"].shape[0])
    return jnp.sum(loss_mask(batch))


def _expert_load(cfg: Config, totals: dict):
    """[layers, experts]: each expert's fraction of the routed token copies."""
    return totals["expert_counts"] / (jnp.maximum(totals["router_rows"], 1.0)[:, None] * cfg.model.top_k)


def combine(cfg: Config, terms: dict, total_tokens, router_totals: dict | None = None) -> tuple[jax.Array, dict]:
    """(loss to differentiate, metrics) from summed terms, each divided by total_tokens (the
    whole batch's `normalizer`, so micro-batches add up exactly).

    router_totals ({expert_counts [layers, E], router_rows [layers]} of the whole batch)
    make the router losses of a micro-batch its exact share of the whole batch's: the
    balancing loss is linear in the probabilities once the counts (which carry no gradient)
    are those of the whole batch, and the z-loss is a sum divided by the whole batch's rows.
    """
    total = jnp.maximum(total_tokens, 1.0)
    loss = terms["loss_sum"] / total
    metrics = {"ce_loss": terms["ce_sum"] / total}
    if cfg.train.objective == "dpo":
        metrics.update({name: terms[name] / total for name in DPO_METRICS})
    if cfg.model.is_moe:
        totals = terms if router_totals is None else router_totals
        rows = jnp.sum(totals["router_rows"])
        aux = load_balancing_loss(totals["expert_counts"], terms["prob_sum"], rows)
        z = z_loss(terms["z_sum"], rows)
        aux_coef = cfg.train.aux_loss_coef if cfg.model.balance == "aux_loss" else 0.0  # reported either way
        loss = loss + aux_coef * aux + cfg.train.z_loss_coef * z
        metrics.update(aux_loss=aux, z_loss=z, expert_load=_expert_load(cfg, totals), ep_overflow=terms["ep_overflow"])
        if cfg.model.balance == "bias":  # the whole batch's counts move the bias (train_step)
            metrics["expert_counts"] = totals["expert_counts"]
    else:
        metrics.update(aux_loss=jnp.zeros(()), z_loss=jnp.zeros(()))
    return loss, metrics


# ----------------------------------------------------------------------------- steps


def _micro_batches(batch: dict, n: int) -> dict:
    return jax.tree_util.tree_map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def _router_totals(cfg: Config, params, micro: dict, frozen=None) -> dict:
    """Expert counts and routed rows per layer over all micro-batches: a forward pass with no
    gradient (the logits are unused, so the compiler drops the output layer)."""

    def body(totals, batch):
        if cfg.train.objective == "dpo":
            batch = dpo.flat_pairs(batch)
        _, stats = forward(cfg, params, batch, frozen)
        return {
            "expert_counts": totals["expert_counts"] + stats["expert_counts"],
            "router_rows": totals["router_rows"] + stats["n_tokens"],
        }, None

    m = cfg.model
    zeros = {"expert_counts": jnp.zeros((m.n_layers, m.n_experts)), "router_rows": jnp.zeros((m.n_layers,))}
    return jax.lax.stop_gradient(jax.lax.scan(body, zeros, micro)[0])


def grads_and_metrics(cfg: Config, params, batch, frozen=None, rng=None):
    """Gradients (of the trainable `params` only) of the loss over the whole batch,
    accumulated over grad_accum micro-batches.

    Every term is normalized by the whole batch (cross-entropy by its tokens; the router
    losses by its rows, with its expert counts, taken first by a forward pass), so the
    micro-batches' losses and gradients add up to one big batch's exactly. The extra forward
    pass runs only for MoE models with grad_accum > 1. `rng` drives LoRA dropout.
    """
    n_micro = cfg.train.grad_accum
    total = normalizer(cfg, batch)
    if n_micro == 1:
        micro_loss = lambda p, b: combine(cfg, loss_terms(cfg, p, b, frozen, rng), total)
        (loss, metrics), grads = jax.value_and_grad(micro_loss, has_aux=True)(params, batch)
        return loss, grads, metrics

    micro = _micro_batches(batch, n_micro)
    totals = _router_totals(cfg, params, micro, frozen) if cfg.model.is_moe else None
    grad_fn = jax.value_and_grad(
        lambda p, b, r: combine(cfg, loss_terms(cfg, p, b, frozen, r), total, totals), has_aux=True
    )
    rngs = None if rng is None else jax.random.split(rng, n_micro)

    def body(carry, xs):
        (loss, metrics), grads = grad_fn(params, *xs)
        metrics.pop("expert_load", None)  # of the whole batch already
        metrics.pop("expert_counts", None)
        return jax.tree_util.tree_map(jnp.add, carry, (loss, grads, metrics)), None

    first = jax.tree_util.tree_map(lambda x: x[0], (micro, rngs))
    (_, shapes), grad_shapes = jax.eval_shape(lambda: grad_fn(params, *first))
    shapes = {k: v for k, v in shapes.items() if k not in ("expert_load", "expert_counts")}
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), (jnp.zeros(()), grad_shapes, shapes))
    (loss, grads, metrics), _ = jax.lax.scan(body, zeros, (micro, rngs))
    if totals is not None:
        metrics["expert_load"] = _expert_load(cfg, totals)
        if cfg.model.balance == "bias":
            metrics["expert_counts"] = totals["expert_counts"]
    return loss, grads, metrics


def dropout_rng(cfg: Config, step):
    """LoRA dropout's randomness for a step (None when there is no dropout)."""
    if cfg.lora.rank is None or cfg.lora.dropout == 0:
        return None
    return jax.random.fold_in(jax.random.key(cfg.seed), step)


def train_step(cfg: Config, optimizer: optax.GradientTransformation, state: TrainState, batch, frozen=None):
    loss, grads, metrics = grads_and_metrics(cfg, state.params, batch, frozen, dropout_rng(cfg, state.step))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    counts = metrics.pop("expert_counts", None)
    if counts is not None:  # model.balance=bias: moved after the step, unless the step was skipped
        params = balance.update(cfg.model, params, counts, moved=opt_state.last_finite)
    consecutive, total = nonfinite_counts(opt_state)
    metrics = dict(
        metrics,
        loss=loss,
        grad_norm=optax.global_norm(grads),
        lr=learning_rate(cfg)(state.step),
        nonfinite_consecutive=consecutive,
        nonfinite_total=total,
    )
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(cfg: Config, params, batch, frozen=None) -> dict:
    """Sums for the validation loss: the objective's (cross-entropy; DPO's loss per pair)."""
    terms = loss_terms(cfg, params, batch, frozen)
    return {"ce_sum": terms["loss_sum"], "n_tokens": normalizer(cfg, batch)}


def _with_rules(cfg: Config, fn):
    """Trace `fn` with the logical-axis rules of cfg.mesh.rules active."""

    @functools.wraps(fn)
    def wrapped(*args):
        with nn.logical_axis_rules(rules(cfg)):
            return fn(*args)

    return wrapped


# XLA:CPU's memory-optimized scheduler orders the train step so fewer scan stacks are live
# at once: smaller temporaries and fewer fresh pages faulted in per step (measured in
# benchmarks/README.md). CPU only: TPU and GPU plans keep their backend's own scheduler.
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options(mesh=None) -> dict | None:
    """The XLA options for the train step on the platform it compiles for: the mesh's
    devices (an AOT plan's TPU topology included), else the default backend."""
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return dict(CPU_COMPILER_OPTIONS) if platform == "cpu" else None


def jit_steps(cfg: Config, optimizer, mesh=None, state_sharding=None, frozen_sharding=None):
    """(train_step(state, batch, frozen), eval_step(params, batch, frozen)), compiled; the
    train step donates the old state. With a mesh, call them inside `jax.set_mesh(mesh)`;
    batches are split over the batch axes."""
    train_fn = _with_rules(cfg, functools.partial(train_step, cfg, optimizer))
    eval_fn = _with_rules(cfg, functools.partial(eval_step, cfg))
    options = compiler_options(mesh)
    if mesh is None:
        return jax.jit(train_fn, donate_argnums=0, compiler_options=options), jax.jit(eval_fn)
    batch, rep = batch_sharding(mesh), replicated(mesh)
    frozen = frozen_sharding if frozen_sharding is not None else {}
    train = jax.jit(
        train_fn,
        donate_argnums=0,
        in_shardings=(state_sharding, batch, frozen),
        out_shardings=(state_sharding, rep),
        compiler_options=options,
    )
    evaluate = jax.jit(eval_fn, in_shardings=(state_sharding.params, batch, frozen), out_shardings=rep)
    return train, evaluate


def flops_per_token(cfg: Config, active_params: int) -> float:
    """Training FLOPs per token: 6 x active matmul params + attention scores and values."""
    m = cfg.model
    norm_scales = (2 * m.n_layers + 1) * m.d_model  # elementwise, not matmul weights
    matmul_params = active_params - m.vocab_size * m.d_model - norm_scales  # the embedding lookup is free
    attention = 12 * m.n_layers * cfg.train.seq_len * m.n_heads * m.resolved_head_dim
    return 6.0 * matmul_params + attention
