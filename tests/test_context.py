"""Context parallelism on 8 CPU devices: attention over sequence shards (all_gather, ring,
the sliding-window halo) and whole train steps under meshes with `context` equal one device."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from test_aot import needs_libtpu
from test_loop import checkpoint_steps, moe_train, records
from test_sharding import run_config, sharded_grads

from moe import config as C
from moe.infer import generate
from moe.model import init
from moe.model.attention import attention_mask, dot_product_attention
from moe.parallel import context
from moe.parallel import mesh as S
from moe.plan import aot
from moe.training import step as T

from helpers import ROOT

SEQ = 32


def context_mesh(n_shards: int) -> Mesh:
    devices = np.asarray(jax.devices()[:n_shards]).reshape(1, 1, n_shards, 1, 1)
    return Mesh(devices, S.AXES)


def packed_segments(rows: int, seq: int, seed: int = 0):
    """[rows, seq] document ids, several documents per row, boundaries anywhere."""
    rng = np.random.default_rng(seed)
    starts = (rng.random((rows, seq)) < 0.15).astype(np.int32)
    starts[:, 0] = 1
    return np.cumsum(starts, axis=1).astype(np.int32)


def qkv(seed=0, batch=2, seq=SEQ, kv=2, group=2, head_dim=8):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, seq, kv, group, head_dim))
    k, v = rng.normal(size=(2, batch, seq, kv, head_dim))
    return tuple(jnp.asarray(a, jnp.float32) for a in (q, k, v))


def attend_one_device(q, k, v, *, index, window, seg):
    return dot_product_attention(q, k, v, index, index, window, seg, seg)


def attend_shards(mesh, q, k, v, *, seg, window, strategy):
    return context.attention(
        mesh,
        q,
        k,
        v,
        seg,
        window=window,
        strategy=strategy,
        local_attention=dot_product_attention,
        mask_fn=attention_mask,
    )


def value_and_grads(attend, q, k, v):
    """(the output, the gradients of sum(sin(output)) with respect to q, k and v)"""

    def both(q, k, v):
        out, pullback = jax.vjp(attend, q, k, v)
        return out, pullback(jnp.cos(out))

    return jax.jit(both)(q, k, v)


# windows for a shard of SEQ / n rows: none, inside one shard, a halo of exactly one
# shard (W - 1 = shard), a halo over several shards, the whole sequence (no halo)
def windows(n_shards):
    shard = SEQ // n_shards
    return [None, max(2, shard // 2), shard + 1, 2 * shard + 3, SEQ]


def check_against_one_device(n_shards, strategy, window_sizes):
    q, k, v = qkv()
    index = jnp.arange(SEQ)[None]
    mesh = context_mesh(n_shards)
    for window in window_sizes:
        for seg in (None, jnp.asarray(packed_segments(2, SEQ))):  # documents cross shard boundaries
            reference = functools.partial(attend_one_device, index=index, window=window, seg=seg)
            want = value_and_grads(reference, q, k, v)
            with jax.set_mesh(mesh):
                got = value_and_grads(
                    functools.partial(attend_shards, mesh, seg=seg, window=window, strategy=strategy), q, k, v
                )
            case = f"window={window} packed={seg is not None}"
            np.testing.assert_allclose(got[0], want[0], atol=1e-5, err_msg=case)
            for a, b in zip(got[1], want[1]):
                np.testing.assert_allclose(a, b, atol=1e-5, err_msg=case)


@pytest.mark.parametrize("n_shards", [2, 4, 8])
@pytest.mark.parametrize("strategy", ["all_gather", "ring"])
def test_attention_over_shards_equals_one_device_in_value_and_gradient(n_shards, strategy):
    check_against_one_device(n_shards, strategy, windows(n_shards))


def test_ring_steps_in_pieces_of_query_rows_equal_one_device(monkeypatch):
    # long shards split each ring step's queries (8 rows here) into rematerialized pieces of 2
    monkeypatch.setattr(context, "BLOCK_SCORES", 16)
    monkeypatch.setattr(context, "MIN_ROWS", 2)
    assert context._rows_per_block(8, 8) == 2
    check_against_one_device(4, "ring", [None, SEQ])


def test_halo_pieces_cover_the_window():
    assert context.halo_pieces(window=5, shard=8) == [4]
    assert context.halo_pieces(window=9, shard=8) == [8]
    assert context.halo_pieces(window=20, shard=8) == [8, 8, 3]
    assert context.halo_pieces(window=1, shard=8) == []


def exchanged_bytes(n_shards: int, window, strategy="all_gather", seq=64) -> int:
    """Collective bytes per device of the compiled forward attention of one layer."""
    q, k, v = qkv(batch=1, seq=seq)
    mesh = context_mesh(n_shards)
    fn = lambda q, k, v: context.attention(  # noqa: E731
        mesh,
        q,
        k,
        v,
        None,
        window=window,
        strategy=strategy,
        local_attention=dot_product_attention,
        mask_fn=attention_mask,
    )
    with jax.set_mesh(mesh):
        text = jax.jit(fn).lower(q, k, v).compile().as_text()
    return aot.collective_bytes(text)


def test_the_halo_exchange_moves_w_rows_whatever_the_context_size():
    # keys and values, [1 row, W - 1 positions, 2 kv heads, 8 dims] each, float32
    for window in (5, 9, 20):
        want = 2 * (window - 1) * 2 * 8 * 4
        assert [exchanged_bytes(n, window) for n in (2, 4, 8)] == [want] * 3, window
    # without a window every device gathers the whole sequence's keys and values (64 rows)
    assert [exchanged_bytes(n, None) for n in (2, 4)] == [2 * 64 * 2 * 8 * 4] * 2


MESHES = {
    "context=2": dict(data=4, context=2),
    "context=4": dict(data=2, context=4),
    "context=8": dict(data=1, context=8),
    "data=2,fsdp=2,context=2": dict(data=2, fsdp=2, context=2),
    "context=2,expert=4": dict(data=1, context=2, expert=4),
    "context=4,tensor=2": dict(data=1, context=4, tensor=2),
}
# (mesh, sliding window, strategy): windows inside a shard, of one shard, over several
CASES = [(name, None, "all_gather") for name in MESHES] + [
    ("context=8", None, "ring"),
    ("context=2,expert=4", None, "ring"),
    ("context=4", 3, "auto"),
    ("context=4", 5, "auto"),
    ("context=8", 7, "auto"),
    ("context=4,tensor=2", 11, "auto"),
]


def step_batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    rows, seq = cfg.train.batch_size, cfg.train.seq_len
    tokens = rng.integers(0, cfg.model.vocab_size, size=(rows, seq + 1)).astype(np.int32)
    segments = packed_segments(rows, seq, seed)
    starts = np.maximum.accumulate(np.where(np.diff(segments, axis=1, prepend=0) != 0, np.arange(seq), 0), axis=1)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segments,
        "positions": (np.arange(seq) - starts).astype(np.int32),
    }


@pytest.fixture(scope="module")
def references():
    """{window: (params, (loss, grads, metrics))} on one device."""
    out = {}
    for window in sorted({w for _, w, _ in CASES}, key=str):
        cfg = step_config(None, window)
        params = jax.device_get(T.init_state(cfg, jax.random.key(0)).params)
        with jax.default_device(jax.devices()[0]):
            result = jax.jit(lambda p, b, cfg=cfg: T.grads_and_metrics(cfg, p, b))(params, step_batch(cfg))
        out[window] = params, jax.device_get(result)
    return out


def step_config(mesh, window, strategy="auto"):
    cfg = run_config(mesh, sliding_window=window, context_parallel=strategy, max_seq_len=SEQ)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=SEQ))


@pytest.mark.slow
@pytest.mark.parametrize("name,window,strategy", CASES, ids=[f"{n}-w{w}-{s}" for n, w, s in CASES])
def test_train_step_under_context_equals_one_device(name, window, strategy, references):
    params, (ref_loss, ref_grads, ref_metrics) = references[window]
    cfg = step_config(MESHES[name], window, strategy)
    (loss, grads, metrics), _ = sharded_grads(cfg, params, step_batch(cfg))
    assert abs(float(loss) - float(ref_loss)) <= 1e-5
    np.testing.assert_allclose(metrics["aux_loss"], ref_metrics["aux_loss"], atol=1e-6)  # global statistics
    np.testing.assert_allclose(metrics["expert_load"], ref_metrics["expert_load"], atol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree_util.tree_leaves(ref_grads)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5, jax.tree_util.keystr(path)


def test_a_context_size_that_does_not_divide_the_sequence_is_refused():
    cfg = step_config(dict(data=1, context=8), None)
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=36))
    with pytest.raises(C.ConfigError, match=r"train.seq_len \(36\) must be divisible by mesh.context \(8\)"):
        S.make_mesh(bad)
    wide = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=36))
    with pytest.raises(C.ConfigError, match=r"divisible by mesh.fsdp x mesh.context \(8\)"):
        S.make_mesh(wide)


def test_decoding_under_a_context_mesh_is_refused():
    cfg = step_config(dict(data=1, context=2), None)
    params = init(cfg.model, jax.random.key(0))
    with jax.set_mesh(S.make_mesh(dataclasses.replace(cfg, mesh=C.MeshConfig(data=4, context=2)))):
        with pytest.raises(C.ConfigError, match="decode under a mesh with mesh.context=1"):
            generate(cfg.model, params, [[1, 2, 3]], 2)


LONG = ["train.seq_len=8192", "model.max_seq_len=8192", "model.sliding_window=3000", "train.batch_size=2"]
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


@pytest.mark.slow
def test_moe_train_at_8k_tokens_over_four_context_shards_equals_one_device_and_resumes_after_a_kill(tmp_path):
    """8192 tokens per sequence, a 3000-key window (each shard of 2048 reaches two shards
    back): mesh.context=4 x data=2 on 8 CPU devices against one device, killed after the
    checkpoint of step 2 and resumed."""
    # data.workers=0: at this length a batch outgrows a pipe's buffer and grain's close
    # waits out its timeout (moe/training/loop.py _close_data), a minute per run
    common = [*LONG, "train.steps=4", "checkpoint.every_steps=2", "train.eval_every=4", "data.workers=0"]
    one = moe_train(tmp_path / "one", *common)
    assert one.returncode == 0, one.stdout + one.stderr
    sharded = [*common, "mesh.data=2", "mesh.context=4"]
    killed = moe_train(tmp_path / "context", *sharded, env={**EIGHT_DEVICES, "MOE_FAULT_SIGKILL_AT_STEP": "3"})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert checkpoint_steps(tmp_path / "context") == [2]
    resumed = moe_train(tmp_path / "context", *sharded, env=EIGHT_DEVICES)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from the checkpoint at step 2" in resumed.stdout + resumed.stderr
    assert "'context': 4" in (tmp_path / "context" / "train.log").read_text()
    a, b = records(tmp_path / "one"), records(tmp_path / "context")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["batch_crc32"] for r in a] == [r["batch_crc32"] for r in b]  # the same batches, resumed or not
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], atol=1e-5)


def tpu_plan(tmp_path, name, *overrides):
    """`moe aot` of a small tiny-moe for v5p-8 (4 chips) with a 64-key window: its report."""
    from test_aot import moe_aot

    out = tmp_path / f"{name}.json"
    common = ["model.vocab_size=512", "model.n_layers=1", "model.sliding_window=64", "train.batch_size=4"]
    common += ["model.max_seq_len=2048"]
    result = moe_aot(ROOT / "configs/tiny-moe.yaml", "--topology", "v5p-8", "--out", out, *common, *overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text())


@needs_libtpu
@pytest.mark.slow
def test_the_tpu_plans_halo_bytes_per_sequence_hold_as_the_context_size_or_the_sequence_doubles(tmp_path):
    # the compiled TPU programs' collective-permutes (the halo, forward and backward, one
    # layer) per sequence a chip holds: the same for 2 and 4 shards of 1024 tokens and for
    # 4 shards of 2048; the all-gathers of fsdp's weights are left aside
    plans = {
        "context=2": (
            tpu_plan(tmp_path, "c2", "train.seq_len=1024", "mesh.data=1", "mesh.fsdp=2", "mesh.context=2"),
            2,
        ),
        "context=4": (tpu_plan(tmp_path, "c4", "train.seq_len=1024", "mesh.data=1", "mesh.context=4"), 4),
        "context=4, 2048": (
            tpu_plan(tmp_path, "c4-long", "train.seq_len=2048", "mesh.data=1", "mesh.context=4"),
            4,
        ),
    }
    per_row = {}
    for name, (report, rows) in plans.items():
        assert report["fits"] and report["mesh"]["context"] == int(name[8])
        per_row[name] = report["collective_bytes_by_kind"]["collective-permute"] / rows
    assert len(set(per_row.values())) == 1 and per_row["context=2"] > 0, per_row


def test_lora_adapters_over_context_and_expert_shards_equal_one_device():
    """Adapters on q, v, the experts and the router; context=2 x expert=4: the logits and
    every gradient (adapters and base) equal one device's."""
    from jax.sharding import NamedSharding
    from test_lora import ALL, lora_params

    import moe.model as model_lib
    from moe.training import state as state_lib

    cfg = C.Config(
        model=dataclasses.replace(run_config().model, max_seq_len=SEQ),
        lora=dataclasses.replace(ALL, targets=("q", "v", "mlp", "gate")),
        train=C.TrainConfig(batch_size=4, seq_len=SEQ),
        mesh=C.MeshConfig(data=1, context=2, expert=4),
    )
    params = lora_params(cfg.model, cfg.lora)
    tokens = jax.random.randint(jax.random.key(5), (4, SEQ), 0, cfg.model.vocab_size)
    weights = jax.random.normal(jax.random.key(6), (4, SEQ, cfg.model.vocab_size))

    def loss(p, t):  # a mean over the tokens, as the training loss
        return jnp.sum(model_lib.apply(cfg.model, p, t, lora=cfg.lora)[0] * weights) / tokens.size

    want = jax.jit(jax.value_and_grad(loss))(params, tokens)
    mesh = S.make_mesh(cfg)
    shardings = state_lib.like_params(cfg, mesh, params)
    with jax.set_mesh(mesh):
        fn = jax.jit(T._with_rules(cfg, jax.value_and_grad(loss)), in_shardings=(shardings, S.batch_sharding(mesh)))
        got = fn(
            jax.device_put(params, shardings), jax.device_put(tokens, NamedSharding(mesh, S.batch_sharding(mesh).spec))
        )
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got[1])[0], jax.tree_util.tree_leaves(want[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=jax.tree_util.keystr(path))
