"""LoRA in the model: exact at B = 0, per-expert adapters against a per-token loop in every
dispatch path and under expert parallelism, merge equal to the adapted model."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import moe.model as model_lib
from moe.config import LoRAConfig
from moe.model import dispatch as dispatch_lib
from moe.model import lora as lora_lib
from moe.model.lora import is_adapter
from moe.model.moe import SparseMoE, route

from helpers import tiny_model

ALL = LoRAConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "mlp", "gate"))


def lora_params(cfg, lora, seed=0, b_scale=0.3):
    """Params with adapters whose B is random (an adapter that has trained)."""
    params = jax.jit(lambda r: nn.unbox(model_lib.init_boxed(cfg, r, lora)))(jax.random.key(seed))
    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(flat))
    for key, (path, value) in zip(keys, sorted(flat.items())):
        if path[-1].endswith("_lora_b"):
            flat[path] = b_scale * jax.random.normal(key, value.shape, value.dtype)
    return traverse_util.unflatten_dict(flat)


def base_of(params):
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if not is_adapter(p)})


@pytest.mark.parametrize("n_experts", [0, 4])
def test_untrained_adapters_leave_the_model_exactly_as_it_was(n_experts):
    cfg = tiny_model(n_experts=n_experts)
    lora = dataclasses.replace(ALL, targets=("q", "k", "v", "o", "mlp") + (("gate",) if n_experts else ()))
    params = lora_params(cfg, lora, b_scale=0.0)  # B = 0, as initialized
    tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, cfg.vocab_size)
    with_lora, _ = model_lib.apply(cfg, params, tokens, lora=lora)
    plain, _ = model_lib.apply(cfg, base_of(params), tokens)
    np.testing.assert_array_equal(np.asarray(with_lora), np.asarray(plain))
    assert sum(is_adapter(p) for p in traverse_util.flatten_dict(params)) == 2 * (8 if n_experts else 7)


@pytest.mark.parametrize("n_experts", [0, 4])
def test_every_b_is_zero_as_initialized_and_the_model_is_unchanged(n_experts):
    cfg = tiny_model(n_experts=n_experts)
    lora = dataclasses.replace(ALL, targets=("q", "k", "v", "o", "mlp") + (("gate",) if n_experts else ()))
    params = jax.jit(lambda r: nn.unbox(model_lib.init_boxed(cfg, r, lora)))(jax.random.key(0))
    flat = traverse_util.flatten_dict(params)
    b_paths = [p for p in flat if p[-1].endswith("_lora_b")]
    assert len(b_paths) == (8 if n_experts else 7)
    for path in b_paths:
        assert not np.any(np.asarray(flat[path])), path
        a = flat[(*path[:-1], path[-1].replace("_lora_b", "_lora_a"))]
        assert np.std(np.asarray(a)) > 0, path  # A random: the pair learns from the first step
    tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, cfg.vocab_size)
    with_lora, _ = model_lib.apply(cfg, params, tokens, lora=lora)
    plain, _ = model_lib.apply(cfg, base_of(params), tokens)
    np.testing.assert_array_equal(np.asarray(with_lora), np.asarray(plain))


def _loop_reference(x_td, gate, w1, w3, w2, top_k, scale):
    """Per token, per chosen expert: that expert's own W + scale * A_e B_e, one row at a time."""

    def merged(w, e=None):
        if not isinstance(w, tuple):
            return w if e is None else w[e]
        base, a, b = w
        return (base + scale * a @ b) if e is None else (base[e] + scale * a[e] @ b[e])

    logits = x_td @ merged(gate)
    _, weight, idx = route(logits, top_k)
    out = np.zeros_like(x_td)
    for t in range(x_td.shape[0]):
        for k in range(top_k):
            e = int(idx[t, k])
            h = jax.nn.silu(x_td[t] @ merged(w1, e)) * (x_td[t] @ merged(w3, e))
            out[t] += float(weight[t, k]) * np.asarray(h @ merged(w2, e))
    return out


@pytest.mark.parametrize("dispatch", sorted(dispatch_lib.DISPATCH))
def test_expert_adapters_match_a_per_token_loop(dispatch):
    cfg = tiny_model(moe_dispatch=dispatch)
    lora = dataclasses.replace(ALL, targets=("mlp", "gate"))
    x = jax.random.normal(jax.random.key(0), (2, 5, cfg.d_model))
    block = SparseMoE(cfg, lora)
    variables = block.init(jax.random.key(1), x)
    p = dict(nn.unbox(variables["params"]))
    for i, name in enumerate(["w1", "w2", "w3", "gate"]):
        p[f"{name}_lora_b"] = 0.3 * jax.random.normal(jax.random.key(10 + i), p[f"{name}_lora_b"].shape)
    y, _ = block.apply({"params": p}, x)
    triple = lambda n: (np.asarray(p[n]), np.asarray(p[f"{n}_lora_a"]), np.asarray(p[f"{n}_lora_b"]))
    ref = _loop_reference(
        np.asarray(x).reshape(-1, cfg.d_model),
        *map(triple, ["gate", "w1", "w3", "w2"]),
        cfg.top_k,
        lora.alpha / lora.rank,
    )
    np.testing.assert_allclose(np.asarray(y).reshape(-1, cfg.d_model), ref, atol=1e-5, rtol=1e-5)


def test_expert_parallel_adapters_equal_one_device():
    """expert=8 over 8 CPU devices, adapters on every expert and the router, equals 1 device."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from moe import config as config_lib
    from moe.parallel import mesh as mesh_lib
    from moe.training import state as state_lib
    from moe.training.step import _with_rules

    cfg = config_lib.Config(
        model=tiny_model(n_experts=8, moe_dispatch="grouped"),
        lora=dataclasses.replace(ALL, targets=("q", "mlp", "gate")),
        train=config_lib.TrainConfig(batch_size=8, seq_len=8),
        mesh=config_lib.MeshConfig(data=1, expert=8),
    )
    params = lora_params(cfg.model, cfg.lora)
    tokens = jax.random.randint(jax.random.key(5), (8, 8), 0, cfg.model.vocab_size)
    single, _ = jax.jit(lambda p, t: model_lib.apply(cfg.model, p, t, lora=cfg.lora))(params, tokens)
    mesh = mesh_lib.make_mesh(cfg)
    shardings = state_lib.like_params(cfg, mesh, params)
    assert any("expert" in str(s.spec) for s in jax.tree_util.tree_leaves(shardings["layers"]["moe"]))
    fn = _with_rules(cfg, lambda p, t: model_lib.apply(cfg.model, p, t, lora=cfg.lora)[0])
    with jax.set_mesh(mesh):
        sharded = jax.jit(fn, in_shardings=(shardings, NamedSharding(mesh, P(mesh_lib.BATCH_AXES))))(
            jax.device_put(params, shardings), tokens
        )
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=1e-5)


def test_lora_dropout_draws_other_masks_on_other_devices():
    """data=8: each device dispatches its own tokens under shard_map; with the same sequence on
    every device, the experts' outputs differ only where the dropout masks do."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from moe import config as config_lib
    from moe.parallel import mesh as mesh_lib
    from moe.training import state as state_lib
    from moe.training.step import _with_rules

    lora = dataclasses.replace(ALL, targets=("mlp",), dropout=0.5)
    cfg = config_lib.Config(
        model=tiny_model(n_experts=4, moe_dispatch="grouped"),
        lora=lora,
        train=config_lib.TrainConfig(batch_size=8, seq_len=8),
        mesh=config_lib.MeshConfig(data=8),
    )
    params = lora_params(cfg.model, lora)
    tokens = jnp.tile(jax.random.randint(jax.random.key(5), (1, 8), 0, cfg.model.vocab_size), (8, 1))
    mesh = mesh_lib.make_mesh(cfg)
    shardings = state_lib.like_params(cfg, mesh, params)

    def logits(rng):
        fn = _with_rules(cfg, lambda p, t: model_lib.apply(cfg.model, p, t, lora=lora, dropout_rng=rng)[0])
        with jax.set_mesh(mesh):
            return np.asarray(
                jax.jit(fn, in_shardings=(shardings, NamedSharding(mesh, P(mesh_lib.BATCH_AXES))))(
                    jax.device_put(params, shardings), tokens
                )
            )

    plain = logits(None)
    np.testing.assert_allclose(plain, np.broadcast_to(plain[:1], plain.shape), atol=1e-6)  # same rows alike
    dropped = logits(jax.random.key(7))
    assert all(not np.allclose(dropped[0], dropped[i], atol=1e-4) for i in range(1, 8))


@pytest.mark.slow
def test_merged_weights_equal_the_adapted_model():
    cfg = tiny_model()
    params = lora_params(cfg, ALL)
    tokens = jax.random.randint(jax.random.key(4), (2, 9), 0, cfg.vocab_size)
    adapted, _ = model_lib.apply(cfg, params, tokens, lora=ALL)
    merged = lora_lib.merge(params, ALL)
    assert not any(is_adapter(p) for p in traverse_util.flatten_dict(merged))
    plain, _ = model_lib.apply(cfg, merged, tokens)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(adapted), atol=1e-5, rtol=1e-5)
    rs = dataclasses.replace(ALL, rslora=True)
    adapted_rs, _ = model_lib.apply(cfg, params, tokens, lora=rs)
    np.testing.assert_allclose(
        np.asarray(model_lib.apply(cfg, lora_lib.merge(params, rs), tokens)[0]),
        np.asarray(adapted_rs),
        atol=1e-5,
        rtol=1e-5,
    )
    assert not np.allclose(np.asarray(adapted_rs), np.asarray(adapted), atol=1e-3)


def test_dropout_only_when_a_key_is_given():
    cfg = tiny_model()
    lora = dataclasses.replace(ALL, dropout=0.5)
    params = lora_params(cfg, lora)
    tokens = jax.random.randint(jax.random.key(4), (2, 9), 0, cfg.vocab_size)
    plain, _ = model_lib.apply(cfg, params, tokens, lora=lora)
    same, _ = model_lib.apply(cfg, params, tokens, lora=dataclasses.replace(lora, dropout=0.0))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(same))
    dropped, _ = model_lib.apply(cfg, params, tokens, lora=lora, dropout_rng=jax.random.key(0))
    assert not np.allclose(np.asarray(dropped), np.asarray(plain), atol=1e-4)
    assert jnp.all(jnp.isfinite(dropped))


@pytest.mark.slow
def test_adapter_gradients_agree_across_dispatch_paths():
    """The adapters' gradients through each strategy's own product (gmm's custom backward,
    ragged_dot, the block matmul, the gather) equal the dense reference's."""
    lora = dataclasses.replace(ALL, targets=("mlp", "gate"))
    params = lora_params(tiny_model(), lora)
    adapters = {p: v for p, v in traverse_util.flatten_dict(params).items() if is_adapter(p)}
    tokens = jax.random.randint(jax.random.key(6), (2, 9), 0, 97)

    def grads(dispatch):
        cfg = tiny_model(moe_dispatch=dispatch)

        def loss(a):
            full = traverse_util.unflatten_dict({**traverse_util.flatten_dict(params), **a})
            return jnp.sum(jnp.sin(model_lib.apply(cfg, full, tokens, lora=lora)[0]))

        return jax.grad(loss)(adapters)

    reference = grads("dense")
    for dispatch in sorted(set(dispatch_lib.DISPATCH) - {"dense"}):
        got = grads(dispatch)
        for path in reference:
            np.testing.assert_allclose(
                np.asarray(got[path]), np.asarray(reference[path]), atol=1e-5, rtol=1e-4, err_msg=f"{dispatch} {path}"
            )
        assert all(float(jnp.abs(v).max()) > 0 for v in got.values())


@pytest.mark.parametrize("quant", [None, "nf4"])
@pytest.mark.slow
def test_streamed_merge_equals_the_merge_in_memory(tmp_path, quant):
    """`moe lora merge` writes slice by slice what a LoRA (or QLoRA) run merged whole on load
    gives, exactly: the base read a layer at a time, each slice folded with its adapters."""
    from moe import config as config_lib
    from moe.checkpoint.params import restore_params, save_params
    from moe.infer import source as source_lib
    from moe.tune.merge import merge_run

    model = tiny_model(n_experts=4, vocab_size=4096)  # the shipped stdlib-4k tokenizer's
    data = config_lib.DataConfig(tokenizer="experiments/tokenizer/stdlib-4k.model")
    lora = dataclasses.replace(ALL, targets=("q", "v", "mlp", "gate"))
    params = lora_params(model, lora, seed=3)
    base, adapters = (
        base_of(params),
        traverse_util.unflatten_dict({p: v for p, v in traverse_util.flatten_dict(params).items() if is_adapter(p)}),
    )
    (tmp_path / "base").mkdir()
    save_params(tmp_path / "base" / "params", base)
    (tmp_path / "base" / "config.yaml").write_text(
        config_lib.dump(config_lib.Config(model=model, data=data, train=config_lib.TrainConfig(seq_len=32)))
    )
    cfg = config_lib.Config(
        model=model,
        data=data,
        lora=lora,
        quant=config_lib.QuantConfig(base=quant),
        train=config_lib.TrainConfig(seq_len=32, init_from=str(tmp_path / "base")),
    )
    run = tmp_path / "run"
    save_params(run / "checkpoints" / "1" / "params", adapters)
    (run / "config.yaml").write_text(config_lib.dump(cfg))
    (tmp_path / "merged").mkdir()
    merge_run(run, tmp_path / "merged")
    streamed = traverse_util.flatten_dict(restore_params(tmp_path / "merged" / "params"))
    whole = traverse_util.flatten_dict(source_lib.load(run).params)
    assert set(streamed) == set(whole)
    for path, value in whole.items():
        np.testing.assert_array_equal(np.asarray(streamed[path]), value, err_msg=str(path))
    assert not np.array_equal(
        np.asarray(streamed[("layers", "moe", "w1")]),
        np.asarray(traverse_util.flatten_dict(base)[("layers", "moe", "w1")]),
    )
