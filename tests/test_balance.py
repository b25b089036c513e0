"""Auxiliary-loss-free balancing (model.balance=bias, moe/training/balance.py): the bias moves
by rate x sign(mean load - load) of the global batch after every step, the same under
gradient accumulation and on an 8-device mesh with expert parallelism, and it is saved
and restored exactly."""

import jax
import numpy as np
import pytest

from moe import config as C
from moe.checkpoint.runs import RunCheckpoints
from moe.convert import ConversionError, save_hf
from moe.parallel import mesh as S
from moe.training import state as state_lib
from moe.training import step as T
from moe.training.objectives import forward

from helpers import tiny_model

RATE, STEPS = 0.01, 3


def run_config(grad_accum=1, mesh=None, **model):
    m = tiny_model(vocab_size=128, n_experts=8, top_k=2, balance="bias", bias_update_rate=RATE, **model)
    train = C.TrainConfig(batch_size=8, seq_len=16, warmup_steps=0, lr=1e-2, grad_accum=grad_accum)
    return C.Config(model=m, train=train, mesh=C.MeshConfig(**(mesh or {})))


def batches(cfg):
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        tokens = rng.integers(0, cfg.model.vocab_size, size=(8, 17)).astype(np.int32)
        yield {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": np.ones((8, 16), np.int32),
            "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
        }


def bias_of(state):
    return np.asarray(jax.device_get(state.params["layers"]["moe"]["bias"]))


def train(cfg, mesh=None):
    """The bias after each step, and the final state."""
    state = T.init_state(cfg, jax.random.key(0))
    optimizer = T.make_optimizer(cfg, state.params)
    if mesh is None:
        step, _ = T.jit_steps(cfg, optimizer)
        out = []
        for batch in batches(cfg):
            state, _ = step(state, batch)
            out.append(bias_of(state))
        return out, state
    with jax.set_mesh(mesh):
        sharding = state_lib.state_shardings(cfg, mesh, jax.eval_shape(lambda: state))
        step, _ = T.jit_steps(cfg, optimizer, mesh, sharding)
        state, out = jax.device_put(state, sharding), []
        for batch in batches(cfg):
            state, _ = step(state, jax.device_put(batch, S.batch_sharding(mesh)), {})
            out.append(bias_of(state))
        return out, state


@pytest.fixture(scope="module")
def reference():
    return train(run_config())


def test_the_bias_follows_a_numpy_reference_of_the_update_rule(reference):
    cfg = run_config()
    state = T.init_state(cfg, jax.random.key(0))
    step, _ = T.jit_steps(cfg, T.make_optimizer(cfg, state.params))
    expected = np.zeros((cfg.model.n_layers, cfg.model.n_experts), np.float32)
    for batch, got in zip(batches(cfg), reference[0]):
        _, stats = jax.jit(lambda p, b: forward(cfg, p, b))(state.params, batch)  # routed with this step's bias
        counts = np.asarray(stats["expert_counts"], np.float64)  # [layers, experts]
        expected = expected + np.float32(RATE) * np.sign(counts.mean(-1, keepdims=True) - counts).astype(np.float32)
        state, metrics = step(state, batch)
        np.testing.assert_array_equal(got, expected)
        assert "expert_counts" not in metrics
    assert np.abs(expected).max() > 0  # the bias did move


def test_the_auxiliary_loss_is_reported_but_not_trained_on():
    cfg = run_config()
    state = T.init_state(cfg, jax.random.key(0))
    batch = next(batches(cfg))
    loss, _, metrics = jax.jit(lambda p, b: T.grads_and_metrics(cfg, p, b))(state.params, batch)
    assert float(metrics["aux_loss"]) > 0
    z_term = cfg.train.z_loss_coef * float(metrics["z_loss"])
    np.testing.assert_allclose(float(loss), float(metrics["ce_loss"]) + z_term, rtol=1e-6)


def test_gradient_accumulation_moves_the_bias_the_same(reference):
    got, _ = train(run_config(grad_accum=2))
    for a, b in zip(got, reference[0]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mesh", [dict(data=1, expert=8), dict(data=2, expert=4), dict(data=1, fsdp=2, expert=4)])
@pytest.mark.slow
def test_an_eight_device_mesh_with_expert_parallelism_moves_the_bias_the_same(reference, mesh):
    cfg = run_config(mesh=mesh)
    got, _ = train(cfg, S.make_mesh(cfg))
    for a, b in zip(got, reference[0]):
        np.testing.assert_array_equal(a, b)


def test_the_bias_is_saved_and_restored_bit_for_bit(tmp_path, reference):
    _, state = reference
    manager = RunCheckpoints(tmp_path / "checkpoints", keep=1, async_save=False)
    manager.save(STEPS, state.params, state.opt_state, {}, {})
    abstract = jax.eval_shape(lambda: state)
    params, opt_state, _, _ = manager.restore(STEPS, abstract.params, abstract.opt_state)
    manager.close()
    restored, saved = params["layers"]["moe"]["bias"], state.params["layers"]["moe"]["bias"]
    assert np.asarray(restored).tobytes() == np.asarray(saved).tobytes() and np.abs(np.asarray(saved)).max() > 0


def test_bad_balance_settings_and_a_bias_export_are_refused(tmp_path):
    with pytest.raises(C.ConfigError, match="a dense model has none"):
        C.validate_model(tiny_model(n_experts=0, balance="bias"))
    with pytest.raises(C.ConfigError, match="bias_update_rate must be > 0"):
        C.validate_model(tiny_model(balance="bias", bias_update_rate=0.0))
    cfg = run_config().model
    params = jax.tree_util.tree_map(np.asarray, T.init_state(run_config(), jax.random.key(0)).params)
    with pytest.raises(ConversionError, match="balance=bias"):
        save_hf(cfg, params, tmp_path / "out")
