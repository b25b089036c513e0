"""Expert parallelism on 8 CPU devices: the ragged exchange (ragged_all_to_all, emulated on
CPU) and the padded one equal the single-device dispatch in value and gradient, under
skewed routings; receive-buffer overflow is counted; the emulation has the primitive's
semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_sharding import run_config

from moe.model.dispatch import DISPATCH
from moe.parallel import collectives, expert_parallel
from moe.parallel import mesh as S

# ----------------------------------------------------------------------------- the emulation


def _ragged_call(n_devices, operand, output, *offsets_and_sizes):
    """emulated_ragged_all_to_all on n devices; each argument stacked [n_devices, ...]."""
    mesh = jax.make_mesh((n_devices,), ("x",), devices=jax.devices()[:n_devices])
    fn = jax.shard_map(
        lambda *a: collectives.emulated_ragged_all_to_all(*(x[0] for x in a), axis_name="x")[None],
        mesh=mesh,
        in_specs=P("x"),
        out_specs=P("x"),
    )
    args = [jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("x"))) for a in (operand, output, *offsets_and_sizes)]
    return fn, args


def test_the_emulation_reproduces_the_primitives_documented_example():
    # jax.lax.ragged_all_to_all's docstring: axis of size 2
    operand, output = [[1, 2, 2], [3, 4, 0]], np.zeros((2, 4))
    fn, args = _ragged_call(
        2,
        np.asarray(operand, np.float32),
        output,
        [[0, 1], [0, 1]],
        [[1, 2], [1, 1]],
        [[0, 0], [1, 2]],
        [[1, 1], [2, 1]],
    )
    np.testing.assert_array_equal(np.asarray(jax.jit(fn)(*args)), [[1, 3, 0, 0], [2, 2, 4, 0]])


def _random_slices(rng, n, rows, out_rows):
    """Consistent (input_offsets, send_sizes, output_offsets, recv_sizes), each [n, n]: every
    (source, destination) slice placed with gaps on both sides, never overlapping."""
    sizes = rng.integers(0, 3, size=(n, n))
    in_off, out_off = np.zeros((n, n), int), np.zeros((n, n), int)
    for i in range(n):  # source i's slices in a random order, gaps between them
        at = 0
        for j in rng.permutation(n):
            at += rng.integers(0, 2)
            in_off[i, j], at = at, at + sizes[i, j]
        assert at <= rows
    for j in range(n):  # receiver j's slices in a random order
        at = 0
        for i in rng.permutation(n):
            at += rng.integers(0, 2)
            out_off[i, j], at = at, at + sizes[i, j]
        assert at <= out_rows
    return in_off, sizes, out_off, sizes.T.copy()


def test_the_emulation_equals_the_documented_semantics_in_value_and_gradient():
    n, rows, out_rows, d = 4, 12, 14, 3
    rng = np.random.default_rng(0)
    in_off, sizes, out_off, recv = _random_slices(rng, n, rows, out_rows)
    operand = rng.normal(size=(n, rows, d)).astype(np.float32)
    output = rng.normal(size=(n, out_rows, d)).astype(np.float32)
    cotangent = rng.normal(size=(n, out_rows, d)).astype(np.float32)
    # the docstring's loops: what each receiver's result holds, and which rows were sent where
    want, d_operand, d_output = output.copy(), np.zeros_like(operand), cotangent.copy()
    for i in range(n):
        for j in range(n):
            src, dst = (
                slice(in_off[i, j], in_off[i, j] + sizes[i, j]),
                slice(out_off[i, j], out_off[i, j] + sizes[i, j]),
            )
            want[j, dst] = operand[i, src]
            d_operand[i, src] += cotangent[j, dst]
            d_output[j, dst] = 0.0
    fn, args = _ragged_call(n, operand, output, in_off, sizes, out_off, recv)
    got = jax.jit(fn)(*args)
    np.testing.assert_array_equal(np.asarray(got), want)
    grads = jax.jit(jax.grad(lambda a, b: jnp.sum(fn(a, b, *args[2:]) * cotangent), argnums=(0, 1)))(*args[:2])
    np.testing.assert_array_equal(np.asarray(grads[0]), d_operand)
    np.testing.assert_array_equal(np.asarray(grads[1]), d_output)


# ----------------------------------------------------------------------------- the exchanges

MESHES = {
    "expert=2": dict(data=4, expert=2),
    "expert=4": dict(data=2, expert=4),
    "expert=8": dict(data=1, expert=8),
    "fsdp=2,expert=2,tensor=2": dict(data=1, fsdp=2, expert=2, tensor=2),
}
N_EXPERTS, TOKENS, TOP_K, D, F = 8, 48, 2, 16, 24


def routing(kind: str, seed: int = 4):
    """expert indices [TOKENS, TOP_K] (distinct per token) and weights."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        idx = np.stack([rng.permutation(N_EXPERTS)[:TOP_K] for _ in range(TOKENS)])
    elif kind == "one-expert":  # every token's first choice is expert 0 (and its second is 1)
        idx = np.tile([0, 1], (TOKENS, 1))
    else:  # "empty-experts": only experts 0-2 are ever chosen
        idx = np.stack([rng.permutation(3)[:TOP_K] for _ in range(TOKENS)])
    weight = rng.uniform(0.1, 1.0, size=(TOKENS, TOP_K)).astype(np.float32)
    return jnp.asarray(idx, jnp.int32), jnp.asarray(weight / weight.sum(1, keepdims=True))


def expert_weights(seed: int = 3):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (TOKENS, D))
    w1, w3 = (0.3 * jax.random.normal(k, (N_EXPERTS, D, F)) for k in keys[1:3])
    return x, w1, w3, 0.3 * jax.random.normal(keys[3], (N_EXPERTS, F, D))


def _loss(fn, cotangent):
    """sum(fn(x, weight, w1, w3, w2) * cotangent): its value and gradients test every path back."""
    return jax.jit(
        jax.value_and_grad(
            lambda x, weight, w1, w3, w2, idx: jnp.sum(fn(x, idx, weight, w1, w3, w2) * cotangent), argnums=range(5)
        )
    )


CASES = [(mesh, kind, "ragged") for mesh in MESHES for kind in ("random", "one-expert", "empty-experts")] + [
    ("expert=8", kind, "padded") for kind in ("random", "one-expert", "empty-experts")
]


@pytest.mark.parametrize("mesh_name,kind,exchange", CASES, ids=["-".join(c) for c in CASES])
def test_expert_parallel_dispatch_equals_one_device_in_value_and_every_gradient(mesh_name, kind, exchange):
    x, w1, w3, w2 = expert_weights()
    idx, weight = routing(kind)
    cotangent = jax.random.normal(jax.random.key(9), (TOKENS, D))
    mesh = S.make_mesh(run_config(MESHES[mesh_name]))
    parallel = lambda *a: expert_parallel.dispatch(mesh, *a, local_dispatch=DISPATCH["grouped"], exchange=exchange)
    want_loss, want = _loss(DISPATCH["dense"], cotangent)(x, weight, w1, w3, w2, idx)
    got_loss, got = _loss(lambda *a: parallel(*a)[0], cotangent)(x, weight, w1, w3, w2, idx)
    dropped = jax.jit(lambda *a: parallel(*a)[1])(x, idx, weight, w1, w3, w2)
    assert abs(float(got_loss) - float(want_loss)) <= 1e-4
    for name, a, b in zip(("x", "weight", "w1", "w3", "w2"), got, want):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5, name
    assert float(dropped) == 0.0  # the default buffers hold the worst case


def _expected_kept(idx, n_dev, rows):
    """The ragged exchange's drops on `expert` = n_dev (one expert per device), in numpy:
    each device's copies sorted by expert (token order within one); receivers take source
    devices in order until `rows` are full. Returns (kept [TOKENS, TOP_K], overflow)."""
    per_dev = TOKENS // n_dev
    kept, filled, overflow = np.zeros(idx.shape, bool), np.zeros(n_dev, int), 0
    for dev in range(n_dev):
        copies = [(int(idx[t, k]), t, k) for t in range(dev * per_dev, (dev + 1) * per_dev) for k in range(TOP_K)]
        for e, t, k in sorted(copies, key=lambda c: c[0]):  # stable: token order within an expert
            if filled[e] < rows:
                kept[t, k], filled[e] = True, filled[e] + 1
            else:
                overflow += 1
    return kept, overflow


def test_a_bounded_receive_buffer_counts_its_overflow_and_the_dropped_copies_add_zero():
    x, w1, w3, w2 = expert_weights()
    idx, weight = routing("empty-experts")  # experts 0-2 take every copy: devices 0-2 overflow
    mesh = S.make_mesh(run_config(MESHES["expert=8"]))
    copies = TOKENS // 8 * TOP_K
    assert expert_parallel.buffer_rows(copies, 8, None, 1.0) == copies  # 1: a balanced routing fits exactly
    assert expert_parallel.buffer_rows(copies, 8, None, None) == 8 * copies  # the worst case
    rows = expert_parallel.buffer_rows(copies, 8, None, 2.0)
    kept, overflow = _expected_kept(np.asarray(idx), 8, rows)
    assert 0 < overflow < kept.sum()
    y, dropped = jax.jit(
        lambda *a: expert_parallel.dispatch(mesh, *a, local_dispatch=DISPATCH["grouped"], buffer_factor=2.0)
    )(x, idx, weight, w1, w3, w2)
    assert float(dropped) == overflow
    want = DISPATCH["dense"](x, idx, jnp.where(jnp.asarray(kept), weight, 0.0), w1, w3, w2)
    assert np.abs(np.asarray(y) - np.asarray(want)).max() <= 1e-5
    none_kept = ~kept.any(axis=1)
    assert none_kept.any() and np.all(np.asarray(y)[none_kept] == 0.0)  # exactly zero, not small


@pytest.mark.parametrize("exchange", ["padded", "ragged"])
def test_capacity_factor_drops_the_copies_past_capacity_in_order_and_they_add_exactly_zero(exchange):
    # 8 devices on `expert`, one expert each; each device routes its 6 tokens' 12 copies.
    # capacity_factor 2 gives ceil(2 * 12 / 8) = 3 slots per destination device.
    n_dev, tokens_per_dev = 8, TOKENS // 8
    x, w1, w3, w2 = expert_weights()
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 3, size=(TOKENS, TOP_K))  # crowd experts 0-2
    idx[:, 1] = np.where(idx[:, 1] == idx[:, 0], 7, idx[:, 1])
    weight = np.full(idx.shape, 0.5, np.float32)
    # expected: per device, copies in order t * top_k + k; the 4th and later to one expert drop
    kept = np.zeros(idx.shape, bool)
    for dev in range(n_dev):
        seen = np.zeros(n_dev, int)
        for t in range(dev * tokens_per_dev, (dev + 1) * tokens_per_dev):
            for k in range(TOP_K):
                kept[t, k] = seen[idx[t, k]] < 3
                seen[idx[t, k]] += 1
    assert 0 < (~kept).sum() < kept.sum()
    mesh = S.make_mesh(run_config(MESHES["expert=8"]))
    args = (x, jnp.asarray(idx, jnp.int32), jnp.asarray(weight), w1, w3, w2)
    got, dropped = jax.jit(
        lambda *a: expert_parallel.dispatch(
            mesh, *a, local_dispatch=DISPATCH["grouped"], capacity_factor=2.0, exchange=exchange
        )
    )(*args)
    want = DISPATCH["dense"](x, args[1], jnp.asarray(np.where(kept, weight, 0.0)), w1, w3, w2)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5
    assert float(dropped) == 0.0  # capacity drops are the capacity factor's, not overflow
    all_dropped = ~kept.any(axis=1)
    assert all_dropped.any() and np.all(np.asarray(got)[all_dropped] == 0.0)  # exactly zero, not small
