"""The sparse MoE block: router, top-k, renormalized weights, SwiGLU experts, aux statistics.

Router numerics follow Mixtral: logits = x @ W_gate (no bias), softmax in float32, take the
top-k probabilities and renormalize them to sum to 1.

With model.balance=bias the block holds a per-expert bias [experts] that is added to the
scores for the top-k choice only (DeepSeek-V3's auxiliary-loss-free balancing; the train
step moves it, moe/training/balance.py).

The block also returns per-layer sums from which the losses are formed over any set of
tokens, layers and devices (sums reduce; means do not):
  expert_counts [E]  top-k assignments per expert        (-> f_e of the balancing loss)
  prob_sum      [E]  router probabilities summed over tokens (-> P_e)
  z_sum         []   sum of logsumexp(router logits)^2   (-> router z-loss)
  n_tokens      []   tokens counted (padding excluded)
  ep_overflow   []   token copies the expert-parallel receive buffers could not hold
                     (model.ep_buffer_factor; moe/parallel/expert_parallel.py), each adding 0
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe.config import LoRAConfig, ModelConfig
from moe.model import dispatch as dispatch_lib
from moe.model.experts import ExpertList
from moe.model.layers import DTYPES, SwiGLU, kernel_init, param_with_axes
from moe.model.lora import Adapted, adapt, project
from moe.model.qarray import QArray
from moe.parallel import expert_parallel
from moe.parallel import mesh as mesh_lib


def route(logits_te, top_k: int, scores: str = "softmax", norm_topk: bool = True, scale: float = 1.0, bias_e=None):
    """Router scores in float32 and the top-k choice. Returns (probs [tokens, experts],
    weights [tokens, top_k], indices [tokens, top_k]).

    scores: "softmax" over the experts (Mixtral, Qwen3-MoE) or "sigmoid" per expert
    (DeepSeek-V3). bias_e [experts] (balance=bias) is added to the scores for the choice
    only; the weights are the chosen experts' own scores, renormalized to sum to 1 when
    norm_topk, then times `scale`."""
    logits_te = logits_te.astype(jnp.float32)
    probs_te = jax.nn.softmax(logits_te, axis=-1) if scores == "softmax" else jax.nn.sigmoid(logits_te)
    if bias_e is None:
        weight_tk, expert_idx_tk = jax.lax.top_k(probs_te, top_k)
    else:
        _, expert_idx_tk = jax.lax.top_k(probs_te + bias_e.astype(jnp.float32), top_k)
        weight_tk = jnp.take_along_axis(probs_te, expert_idx_tk, axis=-1)
    if norm_topk:
        weight_tk = weight_tk / jnp.sum(weight_tk, axis=-1, keepdims=True)
    if scale != 1.0:
        weight_tk = weight_tk * scale
    return probs_te, weight_tk, expert_idx_tk


def router_stats(logits_te, probs_te, expert_idx_tk, valid_t, sigmoid: bool = False):
    """Per-layer sums for the balancing and z losses; `valid_t` masks out padding. Sigmoid
    scores enter the balancing loss normalized over the experts (as DeepSeek-V3's)."""
    n_experts = probs_te.shape[-1]
    if sigmoid:
        probs_te = probs_te / jnp.sum(probs_te, axis=-1, keepdims=True)
    valid = valid_t.astype(jnp.float32)
    counts = jnp.einsum("tke,t->e", jax.nn.one_hot(expert_idx_tk, n_experts, dtype=jnp.float32), valid)
    z = jax.nn.logsumexp(logits_te.astype(jnp.float32), axis=-1)
    return {
        "expert_counts": counts,
        "prob_sum": jnp.einsum("te,t->e", probs_te, valid),
        "z_sum": jnp.sum(z * z * valid),
        "n_tokens": jnp.sum(valid),
        "ep_overflow": jnp.zeros((), jnp.float32),  # copies expert parallelism could not deliver
    }


class SparseMoE(nn.Module):
    cfg: ModelConfig
    lora: LoRAConfig | None = None  # adapters on the router and on every expert (moe/model/lora.py)

    def _weight(self, name, shape, axes, n_lead, select=None):
        pdt = DTYPES[self.cfg.param_dtype]
        w = param_with_axes(self, name, kernel_init(self.cfg), shape, axes, pdt)
        return adapt(self, name, w, self.lora, n_lead=n_lead, n_in=1, axes=axes, dtype=pdt, select=select)

    @nn.compact
    def __call__(self, x, valid=None, select=None):  # x: [batch, seq, d_model]; valid: [batch, seq] bool
        cfg, dtype = self.cfg, DTYPES[self.cfg.dtype]
        e, d, f = cfg.n_experts, cfg.d_model, cfg.d_ff
        batch, seq, _ = x.shape
        # select [batch, rank]: each row's adapter columns (several adapters served, lora.py)
        select_t = None if select is None else jnp.repeat(select, seq, axis=0)  # [tokens, rank]
        gate = self._weight("gate", (d, e), ("embed", "exp"), 0, select_t)
        w1 = self._weight("w1", (e, d, f), ("exp", "embed", "mlp"), 1)
        w3 = self._weight("w3", (e, d, f), ("exp", "embed", "mlp"), 1)
        w2 = self._weight("w2", (e, f, d), ("exp", "mlp", "embed"), 1)
        x_td = x.reshape(batch * seq, d)
        valid_t = jnp.ones((batch * seq,), bool) if valid is None else valid.reshape(-1)
        weight_tk, expert_idx_tk, stats = self._route(x_td, gate, valid_t, (batch, seq))

        quantized = isinstance(w1.w if isinstance(w1, Adapted) else w1, QArray)
        fn = dispatch_lib.DISPATCH[
            dispatch_lib.resolve(
                cfg.moe_dispatch, batch * seq * cfg.top_k, e, quantized, separate=isinstance(w1, ExpertList)
            )
        ]
        fn = functools.partial(fn, recompute_gated=cfg.recompute_gated)
        x_in = x_td.astype(dtype)
        if select_t is not None and any(isinstance(w, Adapted) for w in (w1, w3, w2)):
            # each token's adapter columns ride with it through the dispatch's sort and exchange
            x_in = jnp.concatenate([x_in, select_t.astype(dtype)], axis=-1)  # [tokens, d_model + rank]
            mark = lambda w: w.replace(select_cols=select_t.shape[-1]) if isinstance(w, Adapted) else w  # noqa: E731
            w1, w3, w2 = mark(w1), mark(w3), mark(w2)
        args = (
            x_in,
            expert_idx_tk,
            weight_tk.astype(dtype),
            w1.astype(dtype),
            w3.astype(dtype),
            w2.astype(dtype),
        )
        mesh = mesh_lib.active_mesh()
        if expert_parallel.wants_shard_map(mesh, batch, seq):  # tokens [batch, seq, ...] as the mesh splits them
            y, stats["ep_overflow"] = expert_parallel.dispatch(
                mesh,
                *(a.reshape(batch, seq, -1) for a in args[:3]),
                *args[3:],
                local_dispatch=fn,
                capacity_factor=cfg.capacity_factor,
                buffer_factor=cfg.ep_buffer_factor,
                exchange=cfg.ep_exchange,
                weight_spec=expert_weight_spec,
            )
        else:
            y = fn(*args).reshape(batch, seq, d)
        if cfg.n_shared_experts:  # every token through the shared experts, one SwiGLU of their summed width
            lora = self.lora if self.lora is not None and "shared" in self.lora.targets else None
            lora = None if lora is None else dataclasses.replace(lora, targets=("mlp",))  # all three, as a dense MLP's
            y = y + SwiGLU(shared_config(cfg), lora, name="shared")(x, select)
        return y, stats

    def _route(self, x_td, gate, valid_t, batch_seq):
        """(top-k weights [tokens, top_k], expert indices [tokens, top_k], router statistics);
        sows what moe/study reads (choices, first-choice probability, logits)."""
        cfg = self.cfg
        logits_te = project(x_td.astype(jnp.float32), gate.astype(jnp.float32), 1)  # [tokens, experts]
        bias_e = None
        if cfg.balance == "bias":  # moved by the train step (moe/training/balance.py), never by gradients
            bias_e = param_with_axes(self, "bias", nn.initializers.zeros, (cfg.n_experts,), ("exp",), jnp.float32)
        probs_te, weight_tk, expert_idx_tk = route(
            logits_te, cfg.top_k, cfg.router_scores, cfg.norm_topk, cfg.routed_scale, bias_e
        )
        stats = router_stats(logits_te, probs_te, expert_idx_tk, valid_t, cfg.router_scores == "sigmoid")
        self.sow("intermediates", "expert_idx", expert_idx_tk.reshape(*batch_seq, -1))  # moe/study/routing.py
        self.sow("intermediates", "top1_prob", probs_te.max(axis=-1).reshape(batch_seq))
        self.sow("intermediates", "router_logits", logits_te.reshape(*batch_seq, -1))  # moe/study/surgery.py
        return weight_tk, expert_idx_tk, stats


def shared_config(cfg: ModelConfig) -> ModelConfig:
    """The shared experts as one dense SwiGLU: n_shared_experts of width d_ff_shared side by
    side are one of their summed width (their outputs add up)."""
    width = cfg.n_shared_experts * (cfg.d_ff_shared or cfg.d_ff)
    return dataclasses.replace(cfg, d_ff=width, n_experts=0, n_shared_experts=0, d_ff_shared=None)


def expert_weight_spec(w, spec, a_spec, b_spec):
    """The shard_map spec of an expert weight under expert parallelism, or of a LoRA-adapted
    one (its pair split over experts alike; the rank dimension whole, and A's rows split over
    `tensor` as W's are for w2, whose partial products the final psum over `tensor` adds up)."""
    if isinstance(w, Adapted):
        return w.replace(
            w=expert_weight_spec(w.w, spec, None, None), a=a_spec, b=b_spec, key=None if w.key is None else P()
        )
    if isinstance(w, QArray):  # quantized: split over experts only, each expert's codes whole
        return jax.tree_util.tree_map(lambda _: P(spec[0]), w)
    return spec


def load_balancing_loss(expert_counts, prob_sum, n_tokens):
    """Switch/Mixtral balancing loss, E * sum_e f_e * P_e, over all rows given.

    expert_counts, prob_sum: [..., E] summed over the tokens (and layers) of the batch;
    n_tokens: the number of rows counted. Leading axes (layers) are summed first, which is
    Hugging Face's formula over the rows of all layers concatenated. Perfect balance
    gives top_k.
    """
    n_experts = expert_counts.shape[-1]
    counts = expert_counts.reshape(-1, n_experts).sum(0)
    probs = prob_sum.reshape(-1, n_experts).sum(0)
    rows = jnp.maximum(n_tokens, 1.0)
    return n_experts * jnp.sum((counts / rows) * (probs / rows))


def z_loss(z_sum, n_tokens):
    """ST-MoE router z-loss: mean over rows of logsumexp(logits)^2."""
    return jnp.sum(z_sum) / jnp.maximum(n_tokens, 1.0)
