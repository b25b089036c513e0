"""MoE variants beyond Mixtral (moe/model/moe.py): shared experts, sigmoid scores, top-k
weights left unnormalized, a routed scale, a choice-only bias, fine-grained experts; each
against an independent per-token, per-expert float64 loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.config import ConfigError, validate_model
from moe.model.dispatch import DISPATCH
from moe.model.moe import SparseMoE, route

from helpers import tiny_model

PATHS = sorted(DISPATCH)
VARIANTS = {  # name -> ModelConfig fields
    "shared experts": dict(n_shared_experts=2, d_ff_shared=24),
    "deepseek-v3 scores": dict(router_scores="sigmoid", routed_scale=2.5, n_shared_experts=1),
    "qwen3 without norm_topk": dict(norm_topk=False),
    "fine-grained 32 top-6": dict(n_experts=32, top_k=6, d_ff=12, n_shared_experts=1, d_ff_shared=12),
}


def _swiglu(x, w1, w3, w2):
    g = x @ w1
    return ((g / (1 + np.exp(-g))) * (x @ w3)) @ w2


def variant_reference(x_td, params, cfg, bias_e=None):
    """The published formulas, one token and one expert at a time, in float64: scores
    (softmax or sigmoid), the top-k chosen on scores + bias, weights the chosen scores
    (renormalized when norm_topk) times routed_scale, plus each shared expert."""
    p = {n: np.asarray(params[n], np.float64) for n in ("gate", "w1", "w3", "w2")}
    bias_e = np.zeros(cfg.n_experts) if bias_e is None else np.asarray(bias_e, np.float64)
    width = cfg.d_ff_shared or cfg.d_ff
    out = np.zeros(x_td.shape, np.float64)
    for t, x in enumerate(np.asarray(x_td, np.float64)):
        logits = x @ p["gate"]
        if cfg.router_scores == "softmax":
            scores = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        else:
            scores = 1 / (1 + np.exp(-logits))
        chosen = np.argsort(-(scores + bias_e), kind="stable")[: cfg.top_k]
        weights = scores[chosen] / (scores[chosen].sum() if cfg.norm_topk else 1.0) * cfg.routed_scale
        for e, w in zip(chosen, weights):
            out[t] += w * _swiglu(x, p["w1"][e], p["w3"][e], p["w2"][e])
        for j in range(cfg.n_shared_experts):
            cols = slice(j * width, (j + 1) * width)
            s = {n: np.asarray(params["shared"][n], np.float64) for n in ("w1", "w3", "w2")}
            out[t] += _swiglu(x, s["w1"][:, cols], s["w3"][:, cols], s["w2"][cols])
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_block_equals_the_per_expert_loop(variant, path):
    cfg = tiny_model(moe_dispatch=path, **VARIANTS[variant])
    x = jax.random.normal(jax.random.key(0), (2, 7, cfg.d_model))
    params = nn.unbox(SparseMoE(cfg).init(jax.random.key(1), x))["params"]
    y, _ = jax.jit(SparseMoE(cfg).apply)({"params": params}, x)
    expected = variant_reference(x.reshape(-1, cfg.d_model), params, cfg).reshape(x.shape)
    assert np.abs(np.asarray(y) - expected).max() <= 1e-5


@pytest.mark.parametrize("scores", ["softmax", "sigmoid"])
def test_a_bias_changes_the_choice_and_never_the_weights(scores):
    logits = jax.random.normal(jax.random.key(2), (50, 8)) * 2
    bias = jnp.asarray([0.0, 3.0, 0.0, -3.0, 0.1, 0.0, 0.0, 0.5])  # expert 1 always chosen, 3 never
    probs, weights, idx = route(logits, 2, scores, norm_topk=False, bias_e=bias)
    expected_probs = jax.nn.softmax(logits) if scores == "softmax" else jax.nn.sigmoid(logits)
    np.testing.assert_allclose(probs, expected_probs, rtol=1e-6)
    np.testing.assert_array_equal(np.sort(idx, axis=1), np.sort(jax.lax.top_k(expected_probs + bias, 2)[1], axis=1))
    assert (idx == 1).any(axis=1).all() and not (idx == 3).any()
    np.testing.assert_array_equal(weights, jnp.take_along_axis(probs, idx, axis=1))  # no bias inside


def routed_copies(seed: int, tokens: int, n_experts: int, top_k: int, d_model: int = 16, d_ff: int = 8):
    """A dispatch's arguments: x [tokens, d_model], expert indices and weights [tokens, top_k]
    from a random router, and the experts' w1, w3 [experts, d_model, d_ff], w2 [experts, d_ff, d_model]."""
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (tokens, d_model))
    w1, w3 = (jax.random.normal(k, (n_experts, d_model, d_ff)) * 0.3 for k in keys[1:3])
    w2 = jax.random.normal(keys[3], (n_experts, d_ff, d_model)) * 0.3
    _, weight, idx = route(jax.random.normal(keys[4], (tokens, n_experts)), top_k)
    return x, idx, weight, w1, w3, w2


@pytest.mark.parametrize("path", [p for p in PATHS if p != "dense"])
@pytest.mark.parametrize("n_experts,top_k", [(32, 8), (64, 6)])
def test_every_dispatch_path_routes_fine_grained_experts_like_dense(path, n_experts, top_k):
    args = routed_copies(3, 45, n_experts, top_k)
    loss = lambda fn: lambda *a: jnp.sum(jnp.cos(fn(*a)))  # noqa: E731
    ref = jax.value_and_grad(loss(DISPATCH["dense"]), argnums=(0, 2, 3, 4, 5))(*args)
    got = jax.jit(jax.value_and_grad(loss(DISPATCH[path]), argnums=(0, 2, 3, 4, 5)))(*args)
    assert abs(float(got[0] - ref[0])) <= 1e-4
    for a, b in zip(got[1], ref[1]):
        assert np.abs(np.asarray(a - b)).max() <= 1e-5 * max(1.0, float(np.abs(np.asarray(b)).max()))


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(n_shared_experts=-1), "n_shared_experts must be >= 0"),
        (dict(n_experts=0, n_shared_experts=1), "needs a sparse model"),
        (dict(d_ff_shared=8), "needs model.n_shared_experts >= 1"),
        (dict(n_shared_experts=1, d_ff_shared=0), "must be >= 1"),
        (dict(routed_scale=0.0), "routed_scale must be > 0"),
        (dict(router_scores="sigmoid", top_k=1), "set model.norm_topk=false"),
    ],
)
def test_bad_variant_fields_are_refused_with_the_fix(fields, message):
    with pytest.raises(ConfigError, match=message):
        validate_model(tiny_model(**fields))


def test_lora_shared_target_adapts_the_shared_experts_only_and_merges_exactly():
    from flax import traverse_util

    from moe.config import LoRAConfig
    from moe.model.lora import merged_weight, scale

    cfg = tiny_model(n_shared_experts=2, d_ff_shared=8)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("shared",))
    x = jax.random.normal(jax.random.key(5), (2, 5, cfg.d_model))
    params = nn.unbox(SparseMoE(cfg, lora).init(jax.random.key(6), x))["params"]
    flat = traverse_util.flatten_dict(params)
    adapted = sorted("/".join(p) for p in flat if p[-1].endswith("_lora_b"))
    assert adapted == ["shared/w1_lora_b", "shared/w2_lora_b", "shared/w3_lora_b"]
    keys = iter(jax.random.split(jax.random.key(7), 3))
    flat = {
        p: (jax.random.normal(next(keys), v.shape) * 0.3 if p[-1].endswith("_lora_b") else v) for p, v in flat.items()
    }
    y, _ = SparseMoE(cfg, lora).apply({"params": traverse_util.unflatten_dict(flat)}, x)
    factor = scale(lora.alpha, lora.rank, lora.rslora)
    base = {p: v for p, v in flat.items() if "_lora_" not in p[-1]}
    plain = dict(base)
    for name in ("w1", "w2", "w3"):
        path = ("shared", name)
        a, b = flat[("shared", f"{name}_lora_a")], flat[("shared", f"{name}_lora_b")]
        plain[path] = merged_weight(flat[path], a, b, factor)
    merged, _ = SparseMoE(cfg).apply({"params": traverse_util.unflatten_dict(plain)}, x)
    without, _ = SparseMoE(cfg).apply({"params": traverse_util.unflatten_dict(base)}, x)
    assert np.abs(np.asarray(y) - np.asarray(merged)).max() <= 1e-5
    assert np.abs(np.asarray(y) - np.asarray(without)).max() > 1e-3  # the adapters do change the output


def test_every_variant_together_trains_the_whole_model():
    """Shared experts, sigmoid scores with a routed scale, qk-norm and 16 fine-grained experts
    in one model: the loss's gradient reaches every parameter, qk-norm scales and shared
    experts included."""
    import moe.model as M
    from moe.model.transformer import Transformer

    cfg = tiny_model(
        n_experts=16, top_k=4, d_ff=12, n_shared_experts=1, router_scores="sigmoid", routed_scale=2.0, qk_norm=True
    )
    params = M.init(cfg, jax.random.key(8))
    tokens = jax.random.randint(jax.random.key(9), (2, 16), 0, cfg.vocab_size)

    def loss(p):
        logits, _ = Transformer(cfg).apply({"params": p}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))

    grads = jax.jit(jax.grad(loss))(params)
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): g
        for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
    }
    assert {"layers/attn/q_norm/scale", "layers/moe/shared/w1", "layers/moe/gate"} <= set(flat)
    for name, g in flat.items():
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0, name


@pytest.mark.parametrize(
    "mesh,n_experts,top_k,exchange",
    [
        (dict(data=1, expert=8), 32, 8, "ragged"),
        (dict(data=2, expert=4), 64, 6, "ragged"),
        (dict(data=1, expert=8), 64, 8, "padded"),
    ],
)
def test_expert_parallelism_exchanges_fine_grained_experts_exactly(mesh, n_experts, top_k, exchange):
    from moe import config as C
    from moe.parallel import expert_parallel
    from moe.parallel import mesh as S

    x, idx, weight, w1, w3, w2 = routed_copies(11, 64, n_experts, top_k)
    cotangent = jax.random.normal(jax.random.key(12), x.shape)
    cfg = C.Config(model=tiny_model(n_experts=n_experts, top_k=top_k), mesh=C.MeshConfig(**mesh))
    device_mesh = S.make_mesh(cfg)

    def parallel(*a):
        return expert_parallel.dispatch(device_mesh, *a, local_dispatch=DISPATCH["grouped"], exchange=exchange)

    def loss(fn):
        return jax.jit(
            jax.value_and_grad(lambda x, w, a, b, c: jnp.sum(fn(x, idx, w, a, b, c) * cotangent), argnums=range(5))
        )

    want_loss, want = loss(DISPATCH["dense"])(x, weight, w1, w3, w2)
    got_loss, got = loss(lambda *a: parallel(*a)[0])(x, weight, w1, w3, w2)
    assert abs(float(got_loss) - float(want_loss)) <= 1e-4
    for name, a, b in zip(("x", "weight", "w1", "w3", "w2"), got, want):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5, name
    assert float(jax.jit(lambda *a: parallel(*a)[1])(x, idx, weight, w1, w3, w2)) == 0.0  # nothing dropped


@pytest.mark.parametrize("dispatch", ["grouped", "gather", "dense"])
def test_quantized_fine_grained_and_shared_experts_compute_their_dequantized_weights(dispatch):
    import moe.model as M
    from moe.model.qarray import QArray
    from moe.quant.params import dequantize_params, quantize_params

    cfg = tiny_model(
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        n_experts=16,
        top_k=4,
        d_ff=64,
        n_shared_experts=1,
        moe_dispatch=dispatch,
    )
    params = M.init(cfg, jax.random.key(12))
    tokens = jax.random.randint(jax.random.key(13), (2, 10), 0, cfg.vocab_size)
    for fmt in ("int4", "nf4"):
        quantized = quantize_params(params, fmt)
        assert isinstance(quantized["layers"]["moe"]["shared"]["w2"], QArray)
        inside = jax.jit(lambda p: M.apply(cfg, p, tokens)[0])(quantized)
        first = jax.jit(lambda p: M.apply(cfg, dequantize_params(p), tokens)[0])(quantized)
        np.testing.assert_array_equal(np.asarray(inside), np.asarray(first))
