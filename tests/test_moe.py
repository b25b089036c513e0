import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from moe.model.dispatch import DISPATCH
from moe.model.moe import SparseMoE, load_balancing_loss, route, router_stats, z_loss

from helpers import hidden_residuals, tiny_model

PATHS = sorted(DISPATCH)


def loop_reference(x_td, params, top_k):
    """Per token, per chosen expert, in float64: the published Mixtral formula."""
    gate, w1, w3, w2 = (np.asarray(params[n], np.float64) for n in ("gate", "w1", "w3", "w2"))
    out = np.zeros_like(x_td, dtype=np.float64)
    for t, x in enumerate(np.asarray(x_td, np.float64)):
        logits = x @ gate
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = np.argsort(-probs, kind="stable")[:top_k]
        weights = probs[chosen] / probs[chosen].sum()
        for e, w in zip(chosen, weights):
            g = x @ w1[e]
            out[t] += w * (((g / (1 + np.exp(-g))) * (x @ w3[e])) @ w2[e])
    return out


def _block(cfg, seed=0, batch=2, seq=7):
    x = jax.random.normal(jax.random.key(seed), (batch, seq, cfg.d_model))
    params = nn.unbox(SparseMoE(cfg).init(jax.random.key(seed + 1), x))["params"]
    return x, params


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_block_equals_per_expert_loop(path, top_k):
    cfg = tiny_model(n_experts=4, top_k=top_k, moe_dispatch=path)
    x, params = _block(cfg)
    y, _ = SparseMoE(cfg).apply({"params": params}, x)
    expected = loop_reference(x.reshape(-1, cfg.d_model), params, top_k).reshape(x.shape)
    assert np.abs(np.asarray(y) - expected).max() <= 1e-5


@pytest.mark.parametrize("path", PATHS)
def test_top_k_equal_to_n_experts_is_the_full_softmax_mixture(path):
    cfg = tiny_model(n_experts=4, top_k=4, moe_dispatch=path)
    x, params = _block(cfg, seed=3)
    y, _ = SparseMoE(cfg).apply({"params": params}, x)
    x64 = np.asarray(x, np.float64).reshape(-1, cfg.d_model)
    logits = x64 @ np.asarray(params["gate"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.zeros_like(x64)
    for e in range(cfg.n_experts):
        g = x64 @ np.asarray(params["w1"][e], np.float64)
        h = g / (1 + np.exp(-g)) * (x64 @ np.asarray(params["w3"][e], np.float64))
        expected += probs[:, e : e + 1] * (h @ np.asarray(params["w2"][e], np.float64))
    assert np.abs(np.asarray(y).reshape(expected.shape) - expected).max() <= 1e-5


@pytest.mark.parametrize("path", [p for p in PATHS if p != "dense"])
def test_dispatch_paths_agree_with_dense_in_value_and_gradient(path):
    cfg = tiny_model(n_experts=4, top_k=2)
    x, params = _block(cfg, seed=5, seq=9)

    def loss(p, x, name):
        y, _ = SparseMoE(dataclasses.replace(cfg, moe_dispatch=name)).apply({"params": p}, x)
        return jnp.sum(jnp.sin(y))

    ref_val, ref_grads = jax.value_and_grad(loss, argnums=(0, 1))(params, x, "dense")
    val, grads = jax.value_and_grad(loss, argnums=(0, 1))(params, x, path)
    assert abs(float(val - ref_val)) <= 1e-5
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        assert np.abs(np.asarray(a - b)).max() <= 1e-5


def test_route_renormalizes_top_k_which_equals_softmax_over_top_logits():
    logits = jax.random.normal(jax.random.key(0), (11, 8))
    probs, weights, idx = route(logits, 2)
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, atol=1e-6)
    top_logits = jnp.take_along_axis(logits, idx, axis=-1)
    np.testing.assert_allclose(np.asarray(weights), np.asarray(jax.nn.softmax(top_logits)), atol=1e-6)
    assert probs.dtype == jnp.float32


def _loss_from_logits(logits_lte, top_k, valid=None):
    stats = []
    for logits in logits_lte:
        probs, _, idx = route(logits, top_k)
        v = jnp.ones(logits.shape[0], bool) if valid is None else valid
        stats.append(router_stats(logits, probs, idx, v))
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *stats)
    return load_balancing_loss(stacked["expert_counts"], stacked["prob_sum"], stacked["n_tokens"].sum()), stacked


def test_balancing_loss_is_top_k_under_perfect_balance():
    # 8 tokens, 4 experts, top-2: each expert chosen by exactly 4 tokens, uniform probabilities.
    counts, prob_sum = jnp.full((1, 4), 4.0), jnp.full((1, 4), 2.0)
    assert float(load_balancing_loss(counts, prob_sum, 8.0)) == pytest.approx(2.0)
    # Near-uniform logits in a rotating pattern give a perfectly balanced top-1 routing.
    logits = 1e-4 * jax.nn.one_hot(jnp.arange(12) % 4, 4)
    loss, _ = _loss_from_logits(logits[None], top_k=1)
    assert float(loss) == pytest.approx(1.0, abs=1e-3)


def test_balancing_loss_with_every_token_on_one_expert():
    # Every token prefers expert 0 with probability p = e^2 / (e^2 + 3): loss = E * 1 * p.
    logits = jnp.tile(jnp.array([[2.0, 0.0, 0.0, 0.0]]), (10, 1))
    loss, _ = _loss_from_logits(logits[None], top_k=1)
    p = np.exp(2) / (np.exp(2) + 3)
    assert float(loss) == pytest.approx(4 * p, rel=1e-6)


def test_balancing_loss_matches_hugging_face_over_layers_and_padding():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = jax.random.normal(jax.random.key(0), (3, 2 * 6, 8))  # [layers, batch*seq, experts]
    valid = jnp.array([1] * 6 + [1, 1, 1, 1, 0, 0], bool)
    ours, _ = _loss_from_logits(logits, top_k=2, valid=valid)
    theirs = load_balancing_loss_func(
        tuple(torch.tensor(np.asarray(l)) for l in logits),
        8,
        2,
        torch.tensor(np.asarray(valid).reshape(2, 6).astype(np.int64)),
    )
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


def test_z_loss_is_mean_squared_logsumexp():
    logits = jax.random.normal(jax.random.key(1), (2, 5, 4))
    _, stacked = _loss_from_logits(logits, top_k=2)
    expected = np.mean(np.asarray(jax.nn.logsumexp(logits, axis=-1)) ** 2)
    assert float(z_loss(stacked["z_sum"], stacked["n_tokens"].sum())) == pytest.approx(expected, rel=1e-5)


def test_router_stats_leave_out_padding():
    logits = jax.random.normal(jax.random.key(2), (6, 4))
    probs, _, idx = route(logits, 2)
    valid = jnp.array([1, 1, 1, 0, 0, 0], bool)
    stats = router_stats(logits, probs, idx, valid)
    assert float(stats["n_tokens"]) == 3 and float(stats["expert_counts"].sum()) == 6
    np.testing.assert_allclose(np.asarray(stats["prob_sum"]), np.asarray(probs[:3].sum(0)), atol=1e-6)


def _dispatch_case(case, tokens, n_experts=4, top_k=2, d_model=16, d_ff=24):
    keys = jax.random.split(jax.random.key(7), 6)
    x = jax.random.normal(keys[0], (tokens, d_model))
    w1, w3 = (jax.random.normal(k, (n_experts, d_model, d_ff)) * 0.3 for k in keys[1:3])
    w2 = jax.random.normal(keys[3], (n_experts, d_ff, d_model)) * 0.3
    weight = jax.nn.softmax(jax.random.normal(keys[4], (tokens, top_k)), axis=-1)
    if case == "one expert":  # every copy on expert 2 (top_k copies of a token on the same expert)
        idx = jnp.full((tokens, top_k), 2, jnp.int32)
    elif case == "empty experts":  # experts 0 and 3 get nothing
        idx = jnp.stack([jnp.ones(tokens, jnp.int32), jnp.full(tokens, 2, jnp.int32)], axis=1)[:, :top_k]
    else:
        idx = jax.random.randint(keys[5], (tokens, top_k), 0, n_experts)
    if case == "skipped copies":  # weight-0 copies, as the empty slots of expert-parallel buffers: no group
        weight = weight.at[::3, 1].set(0.0)
    return x, idx, weight, w1, w3, w2


@pytest.mark.parametrize("path", [p for p in PATHS if p != "dense"])
@pytest.mark.parametrize(
    "case,tokens",
    [("random", 1), ("random", 37), ("one expert", 13), ("empty experts", 21), ("skipped copies", 29), ("random", 300)],
)
def test_every_dispatch_path_matches_the_reference_in_edge_cases(path, case, tokens):
    from moe.model.dispatch import DISPATCH

    args = _dispatch_case(case, tokens)

    def f(fn, *a):
        return jnp.sum(jnp.cos(fn(*a)))

    ref_y = DISPATCH["dense"](*args)
    y = jax.jit(DISPATCH[path])(*args)
    assert np.abs(np.asarray(y - ref_y)).max() <= 1e-5
    # x, the routing weights and every expert weight; a skipped copy's weight has no gradient
    # in the sorting paths (nothing is computed for it), so there only x and the experts
    argnums = (0, 3, 4, 5) if case == "skipped copies" else (0, 2, 3, 4, 5)
    ref_g = jax.grad(lambda *a: f(DISPATCH["dense"], *a), argnums=argnums)(*args)
    g = jax.jit(jax.grad(lambda *a: f(DISPATCH[path], *a), argnums=argnums))(*args)
    for a, b in zip(g, ref_g):  # 1e-5 relative to the gradient's scale (sums over up to 300 tokens)
        assert np.abs(np.asarray(a - b)).max() <= 1e-5 * max(1.0, float(np.abs(np.asarray(b)).max()))


@pytest.mark.parametrize("path", ["dense", "ragged", "sorted", "grouped"])
def test_the_backward_keeps_gate_and_up_but_not_their_gated_product(path):
    """The residuals of a dispatch's VJP: of the [copies, d_ff]-shaped arrays only the two
    products x w1 and x w3; silu(x w1) * (x w3) is recomputed for w2's gradient, unless the
    caller says the layer is rematerialized anyway (then all three are kept)."""
    args = _dispatch_case("random", 37)
    d_model, d_ff = args[3].shape[1:]
    for recompute, kept in ((True, 2), (False, 3)):
        _, vjp_fn = jax.vjp(functools.partial(DISPATCH[path], recompute_gated=recompute), *args)
        assert len(hidden_residuals(vjp_fn, d_model, d_ff)) == kept, recompute


@pytest.mark.parametrize("remat,kept", [("none", 2), ("full", 3)])
def test_the_moe_block_recomputes_the_gated_product_only_where_the_layer_is_not_rematerialized(remat, kept):
    cfg = tiny_model(remat=remat)
    x, params = _block(cfg)
    _, vjp_fn = jax.vjp(lambda p, x: SparseMoE(cfg).apply({"params": p}, x)[0], params, x)
    assert len(hidden_residuals(vjp_fn, cfg.d_model, cfg.d_ff)) == kept


@pytest.mark.parametrize("case,tokens", [("random", 1), ("random", 2), ("one expert", 2), ("empty experts", 1)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_separate_expert_buffers_match_the_reference(case, tokens, dtype):
    """The gather dispatch over ExpertList (decoding on CPU, moe/infer/layout.py): lax.switch
    per copy, each expert its own buffer, cast lazily to the compute dtype."""
    from moe.model.dispatch import DISPATCH, resolve
    from moe.model.experts import ExpertList

    x, idx, weight, w1, w3, w2 = _dispatch_case(case, tokens)
    split = [ExpertList(tuple(w)).astype(dtype) for w in (w1, w3, w2)]
    cast = [w.astype(dtype) for w in (x, weight, w1, w3, w2)]
    y = jax.jit(DISPATCH["gather"])(cast[0], idx, cast[1], *split)
    ref_y = DISPATCH["dense"](cast[0], idx, *cast[1:])
    assert y.dtype == ref_y.dtype
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert np.abs(np.asarray(y, np.float32) - np.asarray(ref_y, np.float32)).max() <= tol
    assert resolve("grouped", copies=2, n_experts=4, separate=True) == "gather"
    with pytest.raises(ValueError, match="separate buffers serve at most 4"):
        resolve("auto", copies=5, n_experts=4, separate=True)


def test_auto_dispatch_gathers_experts_for_few_tokens_only():
    from moe.model.dispatch import resolve

    assert resolve("auto", copies=2, n_experts=8) == "gather"  # one token decoding, top-2
    assert resolve("auto", copies=8, n_experts=8) == "gather"
    assert resolve("auto", copies=9, n_experts=8) == resolve("auto")  # the grouped path of training
    assert resolve("grouped", copies=2, n_experts=8) == "grouped"  # an explicit choice stays


def test_auto_dispatch_on_tpu_is_megablox_with_tiles_that_divide_the_matrices():
    from moe.model.dispatch import resolve
    from moe.model.megablox import tiling

    assert resolve("auto", backend="tpu") == "megablox"
    assert resolve("auto", backend="tpu", quantized=True) == "grouped"  # one expert dequantized at a time
    assert resolve("auto", backend="cpu") == "grouped"
    assert tiling(100, 1536, 14336) == (128, 768, 1024)  # 1536 = 2 x 768; 14336 = 14 x 1024
    assert tiling(5, 96, 4096) == (8, 96, 1024)  # not a multiple of the lane: the whole dimension
