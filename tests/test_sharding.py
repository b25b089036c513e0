"""Sharded train steps on 8 CPU devices equal the single-device step."""

import contextlib
import dataclasses

import jax
import numpy as np
import pytest
from jax._src import compilation_cache

from moe import config as C
from moe.checkpoint.params import restore_params, save_params
from moe.parallel import mesh as S
from moe.training import state as state_lib
from moe.training import step as T

from helpers import tiny_model

MESHES = {
    "data=8": dict(data=8),
    "fsdp=8": dict(data=1, fsdp=8),
    "expert=8": dict(data=1, expert=8),
    "data=4,expert=2": dict(data=4, expert=2),
    "data=2,expert=4": dict(data=2, expert=4),
    "fsdp=2,expert=2,tensor=2": dict(data=1, fsdp=2, expert=2, tensor=2),
}


def run_config(mesh=None, **model):
    m = tiny_model(**{"vocab_size": 128, "d_model": 32, "n_experts": 8, "top_k": 2, "d_ff": 48, **model})
    return C.Config(
        model=m,
        train=C.TrainConfig(batch_size=8, seq_len=16, warmup_steps=0, lr=1e-2),
        mesh=C.MeshConfig(**(mesh or {})),
    )


def batch_for(cfg, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.model.vocab_size, size=(8, 17))
    segments = np.ones((8, 16), np.int32)
    segments[3, 9:] = 2
    positions = np.where(segments == 2, np.arange(16) - 9, np.arange(16))
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "segment_ids": segments,
        "positions": positions.astype(np.int32),
    }


@contextlib.contextmanager
def no_persistent_cache():
    """Neither read nor write the suite's persistent compilation cache inside."""
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        compilation_cache.reset_cache()


def sharded_grads(cfg, params, batch):
    # Compiled fresh, not through the suite's persistent cache: with jax 0.10.2 on CPU, the
    # cached executable of the fsdp x expert x tensor program with grad_accum=2 aborted a
    # process that loaded it back (before the suite freed compiled programs per module, so
    # possibly the same exhaustion of memory mappings; kept until a suite shows otherwise).
    mesh = S.make_mesh(cfg)
    with jax.set_mesh(mesh), no_persistent_cache():
        p_sh = state_lib.param_shardings(cfg, mesh)
        params = jax.device_put(params, p_sh)
        batch = jax.device_put(batch, S.batch_sharding(mesh))
        fn = jax.jit(
            T._with_rules(cfg, lambda p, b: T.grads_and_metrics(cfg, p, b)), in_shardings=(p_sh, S.batch_sharding(mesh))
        )
        loss, grads, metrics = fn(params, batch)
        return jax.device_get((loss, grads, metrics)), params


@pytest.fixture(scope="module")
def reference():
    cfg = run_config()
    params = jax.device_get(T.init_state(cfg, jax.random.key(0)).params)
    with jax.default_device(jax.devices()[0]):
        loss, grads, metrics = jax.jit(lambda p, b: T.grads_and_metrics(cfg, p, b))(params, batch_for(cfg))
    return params, jax.device_get((loss, grads, metrics))


# every dispatch path under shard_map, with expert parallelism (whose send buffers hold
# empty weight-0 slots) and without; grad_accum under a mesh uses the whole batch's counts
CASES = (
    [(name, "auto", 1) for name in sorted(MESHES)]
    + [
        (name, path, 1)
        for name in ("expert=8", "data=2,expert=4", "fsdp=2,expert=2,tensor=2")
        for path in ("ragged", "sorted", "dense")
    ]
    + [("data=8", "ragged", 1), ("fsdp=2,expert=2,tensor=2", "auto", 2)]
)


@pytest.mark.parametrize("name,path,grad_accum", CASES, ids=[f"{n}-{p}-accum{a}" for n, p, a in CASES])
@pytest.mark.slow
def test_sharded_loss_and_grads_equal_single_device(name, path, grad_accum, reference):
    params, (ref_loss, ref_grads, ref_metrics) = reference
    cfg = run_config(MESHES[name], moe_dispatch=path)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=grad_accum))
    (loss, grads, metrics), _ = sharded_grads(cfg, params, batch_for(cfg))
    assert abs(float(loss) - float(ref_loss)) <= 1e-5
    np.testing.assert_allclose(metrics["aux_loss"], ref_metrics["aux_loss"], atol=1e-6)  # global, not per shard
    np.testing.assert_allclose(metrics["expert_load"], ref_metrics["expert_load"], atol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree_util.tree_leaves(ref_grads)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5, jax.tree_util.keystr(path)


@pytest.mark.slow
def test_receive_buffer_overflow_is_counted_and_reported_in_the_step_metrics(reference):
    from moe.training import metrics as metrics_lib

    params, (ref_loss, _, _) = reference
    # one expert per device; receive buffers of 0.25 x a device's 32 copies = 8 rows, so
    # every copy past an expert's 8th in the whole batch is dropped and counted
    cfg = run_config(MESHES["expert=8"], ep_buffer_factor=0.25)
    (loss, _, metrics), _ = sharded_grads(cfg, params, batch_for(cfg))
    copies = np.asarray(metrics["expert_load"]) * 8 * 16 * 2  # [layers, experts] of this run's own routing
    want = np.maximum(np.rint(copies) - 8, 0).sum()
    assert want > 0 and float(metrics["ep_overflow"]) == want
    assert abs(float(loss) - float(ref_loss)) > 1e-3  # the dropped copies changed the output
    record = metrics_lib.step_record(
        1, dict(metrics, loss=loss, grad_norm=0.0, lr=0.0, nonfinite_total=0), 128.0, 1.0, 1.0, 1.0
    )
    assert record["ep_overflow"] == want  # written to metrics.jsonl (and logged as a warning by the loop)


def test_per_device_parameter_bytes_follow_the_mesh(reference):
    params, _ = reference
    total = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(params))
    # expert weights and the router's expert columns are split over `expert`
    expert_bytes = sum(np.asarray(params["layers"]["moe"][w]).nbytes for w in ("w1", "w2", "w3", "gate"))
    for name, expect in [("expert=8", total - expert_bytes * 7 / 8), ("fsdp=8", None), ("data=8", total)]:
        cfg = run_config(MESHES[name])
        mesh = S.make_mesh(cfg)
        placed = jax.device_put(params, state_lib.param_shardings(cfg, mesh))
        held = state_lib.bytes_per_device(placed)
        assert len(held) == 8 and len(set(held.values())) == 1
        per_device = next(iter(held.values()))
        if expect is not None:
            assert per_device == expect, name
        else:  # FSDP: every weight with an embed dimension is split 8 ways; norms and vectors stay whole
            assert per_device < total / 6
        experts = state_lib.bytes_per_device(placed["layers"]["moe"]["w1"])
        if name == "expert=8":
            assert next(iter(experts.values())) * 8 == np.asarray(params["layers"]["moe"]["w1"]).nbytes


def test_checkpoint_saved_under_one_mesh_restores_under_another(tmp_path, reference):
    params, _ = reference
    cfg_a, cfg_b = run_config(MESHES["expert=8"]), run_config(MESHES["fsdp=2,expert=2,tensor=2"])
    mesh_a, mesh_b = S.make_mesh(cfg_a), S.make_mesh(cfg_b)
    save_params(tmp_path / "params", jax.device_put(params, state_lib.param_shardings(cfg_a, mesh_a)))
    target = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        params,
        state_lib.param_shardings(cfg_b, mesh_b),
    )
    restored = restore_params(tmp_path / "params", target)
    for a, b, s in zip(
        jax.tree_util.tree_leaves(restored),
        jax.tree_util.tree_leaves(params),
        jax.tree_util.tree_leaves(state_lib.param_shardings(cfg_b, mesh_b)),
    ):
        assert a.sharding == s
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "mesh,message",
    [
        (dict(data=3), "needs 3 devices but 8 are present"),
        (dict(data=-1, fsdp=-1), "at most one mesh axis may be -1"),
        (dict(data=1, expert=8), None),
        (dict(data=2, tensor=4), "model.n_kv_heads \\(2\\) must be divisible by mesh.tensor \\(4\\)"),
    ],
)
def test_mesh_layouts_that_do_not_divide_are_refused(mesh, message):
    cfg = run_config(mesh)
    if message is None:
        S.make_mesh(cfg)
        bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_experts=4, top_k=2))
        with pytest.raises(C.ConfigError, match="n_experts \\(4\\) must be divisible by mesh.expert \\(8\\)"):
            S.make_mesh(bad)
        bad_batch = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=4))
        with pytest.raises(C.ConfigError, match="must divide over data x fsdp x expert = 8"):
            S.make_mesh(bad_batch)
    else:
        with pytest.raises(C.ConfigError, match=message):
            S.make_mesh(cfg)


def test_fsdp_that_does_not_divide_d_model_is_refused():
    cfg = run_config(dict(data=1, fsdp=8), d_model=36, n_heads=2, n_kv_heads=2)
    with pytest.raises(
        C.ConfigError, match="model.d_model \\(36\\) must be divisible by mesh.fsdp x mesh.context \\(8\\)"
    ):
        S.make_mesh(cfg)


def test_the_replicated_preset_keeps_every_parameter_whole_on_every_device(reference):
    params, _ = reference
    cfg = dataclasses.replace(run_config(dict(data=8)), mesh=C.MeshConfig(data=8, rules="replicated"))
    placed = jax.device_put(params, state_lib.param_shardings(cfg, S.make_mesh(cfg)))
    total = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(params))
    assert set(state_lib.bytes_per_device(placed).values()) == {total}
    default = jax.device_put(
        params, state_lib.param_shardings(run_config(MESHES["fsdp=8"]), S.make_mesh(run_config(MESHES["fsdp=8"])))
    )
    assert max(state_lib.bytes_per_device(default).values()) < total / 4  # the presets really differ


class _SliceDevice:
    """A device of a pretend multislice system (CPU devices have no slice_index)."""

    def __init__(self, index, slice_index):
        self.id, self.slice_index, self.platform, self.device_kind = index, slice_index, "cpu", "cpu"
        self.process_index = 0

    def __repr__(self):
        return f"d{self.id}/s{self.slice_index}"


@pytest.mark.parametrize("axis", ["data", "fsdp", "context"])
def test_dcn_sizes_put_whole_slices_on_the_outer_blocks_of_their_axis(axis):
    # 2 slices of 4 devices; the DCN-crossing axis must change slice only between its halves
    devices = [_SliceDevice(i, i // 4) for i in range(8)]
    mesh = {"data": 1, "fsdp": 1, "context": 1, "expert": 2, "tensor": 1, axis: 4, f"dcn_{axis}": 2}
    grid = S.device_grid(run_config(mesh), devices)
    assert grid.shape == tuple(mesh[a] for a in S.AXES)
    slices = np.vectorize(lambda d: d.slice_index)(np.moveaxis(grid, S.AXES.index(axis), 0))
    assert (slices[:2] == 0).all() and (slices[2:] == 1).all()
    with pytest.raises(C.ConfigError, match="must be divisible by the DCN sizes"):
        S.device_grid(run_config({**mesh, f"dcn_{axis}": 3}), devices)
