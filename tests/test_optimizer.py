"""AdamW as configured: the schedule in closed form, clipping at the norm, weight decay where
the mask says, and Adam's moments laid out like their parameters on 8 devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe import config as C
from moe.parallel import mesh as S
from moe.training import state as state_lib
from moe.training import step as T

from helpers import tiny_model


def cfg_with(**train):
    defaults = dict(lr=1e-2, warmup_steps=10, steps=110, min_lr_ratio=0.1, weight_decay=0.0, clip_norm=0.0)
    return C.Config(model=tiny_model(), train=C.TrainConfig(**{**defaults, **train}))


@pytest.mark.parametrize("step", [0, 1, 5, 10, 35, 60, 109, 110, 200])
def test_learning_rate_is_linear_warmup_then_cosine_to_the_floor(step):
    lr, warmup, total, floor = 1e-2, 10, 110, 1e-3
    if step < warmup:
        want = lr * step / warmup
    else:
        progress = min(step - warmup, total - warmup) / (total - warmup)
        want = floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    assert float(T.learning_rate(cfg_with())(step)) == pytest.approx(want, rel=1e-5, abs=1e-9)


def params_and_grads(scale):
    params = {"w": jnp.full((3, 4), 0.5), "norm": {"scale": jnp.ones(4)}}
    grads = jax.tree_util.tree_map(
        lambda p: scale * jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape) / 10, params
    )
    return params, grads


def first_update(cfg, params, grads):
    optimizer = T.make_optimizer(cfg, params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return updates


@pytest.mark.parametrize("scale", [0.1, 100.0])
def test_gradients_are_clipped_to_the_global_norm_and_no_further(scale):
    # eps=1 makes Adam's first update depend on the gradient's size, so clipping shows
    params, grads = params_and_grads(scale)
    norm = float(optax.global_norm(grads))
    clip = 2.0
    clipped = first_update(cfg_with(clip_norm=clip, eps=1.0, warmup_steps=0), params, grads)
    expected_grads = jax.tree_util.tree_map(lambda g: g * min(1.0, clip / norm), grads)
    expected = first_update(cfg_with(clip_norm=0.0, eps=1.0, warmup_steps=0), params, expected_grads)
    for a, b in zip(jax.tree_util.tree_leaves(clipped), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    unclipped = first_update(cfg_with(clip_norm=0.0, eps=1.0, warmup_steps=0), params, grads)
    differs = any(
        not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(clipped), jax.tree_util.tree_leaves(unclipped))
    )
    assert differs == (norm > clip)


def test_weight_decay_applies_exactly_where_the_mask_says():
    # zero gradients: Adam's step is 0, so the update is -lr * weight_decay * p where decayed
    params, grads = params_and_grads(0.0)
    updates = first_update(cfg_with(weight_decay=0.1, warmup_steps=0), params, grads)
    np.testing.assert_allclose(np.asarray(updates["w"]), -1e-2 * 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(updates["norm"]["scale"]), 0.0)


def test_adam_moments_are_sharded_like_their_params():
    model = tiny_model(vocab_size=128, n_experts=8, top_k=2)
    cfg = C.Config(
        model=model,
        train=C.TrainConfig(batch_size=8, seq_len=16),
        mesh=C.MeshConfig(data=1, fsdp=2, expert=2, tensor=2),
    )
    mesh = S.make_mesh(cfg)
    abstract, shardings = state_lib.abstract_state(cfg, mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda r: T.fresh_state(cfg, r), out_shardings=shardings)(jax.random.key(0))
    param_tree = jax.tree_util.tree_structure(state.params)
    moments = []

    def collect(node):
        if jax.tree_util.tree_structure(node) == param_tree:
            moments.append(node)
            return True
        return False

    jax.tree_util.tree_map(lambda _: None, state.opt_state, is_leaf=collect)
    assert len(moments) == 2  # Adam's mu and nu
    param_bytes = state_lib.bytes_per_device(state.params)
    assert (
        len(set(param_bytes.values())) == 1
        and max(param_bytes.values())
        < sum(x.nbytes for x in jax.tree_util.tree_leaves(jax.device_get(state.params))) / 2
    )
    for moment in moments:
        for p, m in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(moment)):
            assert m.sharding.is_equivalent_to(p.sharding, p.ndim), (m.sharding, p.sharding)
        assert state_lib.bytes_per_device(moment) == param_bytes
