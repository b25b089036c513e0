"""Expert parallelism: token copies travel to the devices that hold their experts and back.

Used by the MoE block under any multi-device mesh (with an `expert` axis of 1, each device
simply dispatches its own tokens to its full set of experts). Each device of the `expert`
axis holds n_experts / n_shards experts (whole experts; their d_model dimension gathered
over `fsdp`, their d_ff dimension split over `tensor`).

Per device, inside shard_map:
    1. route its own tokens (done before, on the sharded batch), flatten to T*k copies
    2. send each copy to the device of its expert (model.ep_exchange):
       "ragged" (default): copies sorted by destination; counts exchanged first (a small
           all_gather), then only the copies themselves with jax.lax.ragged_all_to_all
           (moe/parallel/collectives.py; emulated on CPU) into a receive buffer of `buffer_rows`
       "padded": a fixed send buffer [n_shards, capacity, D] exchanged whole (all_to_all)
    3. run its experts on what it received (the configured local dispatch)
    4. psum over `tensor` (d_ff was split), the same exchange back, weight, sum over k
Dropless by default: capacity = T*k per destination and receive buffers of n_shards x T*k
rows, so no copy is ever dropped (the worst case: every device routes everything to one
device). With model.capacity_factor = c, the capacity is ceil(c * T*k / n_shards) and the
copies beyond it (in token order) are dropped, output 0, in both exchanges. With
model.ep_buffer_factor = b, the ragged receive buffers hold ceil(b * T*k) rows (b = 1 fits
a perfectly balanced routing); a receiver fills them from source device 0 upward, and the
copies that do not fit add 0 and are counted: the block returns their number, which
training reports as `ep_overflow` (never silent).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe.parallel import collectives
from moe.parallel.mesh import BATCH_AXES, CONTEXT_AXIS, EXPERT_AXIS, TENSOR_AXIS, splits_evenly


def wants_shard_map(mesh, n_rows: int, seq: int = 1) -> bool:
    """True under a multi-device mesh, for rows that split over the batch axes and sequences
    over `context` (shape-only traces such as init with one token use the plain dispatch).
    Without it, the compiler may replicate the sort-based dispatch on every device."""
    return mesh is not None and mesh.size > 1 and splits_evenly(mesh, n_rows, seq)


def _positions(dest, n_shards: int):
    """Each copy's position among the copies (in token order) bound for its destination."""
    onehot = jax.nn.one_hot(dest, n_shards, dtype=jnp.int32)  # [T*k, n_shards]
    return jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - 1, dest[:, None], axis=1)[:, 0]


def _capacity(copies: int, n_shards: int, capacity_factor) -> int:
    """Copies one device may send to one destination (all of them when dropless)."""
    return copies if capacity_factor is None else max(1, math.ceil(capacity_factor * copies / n_shards))


def _scatter(values, slot, size):
    """values [n, ...] into a zero buffer [size, ...] at `slot` (slot == size drops)."""
    buffer = jnp.zeros((size + 1, *values.shape[1:]), values.dtype)
    return buffer.at[slot].set(values, unique_indices=False)[:size]


def _run_experts(dispatch, recv_x, recv_e, valid, w1, w3, w2, tensor_split):
    """This device's experts on the copies it received (valid rows only)."""
    y = dispatch(recv_x, recv_e[:, None], valid[:, None].astype(recv_x.dtype), w1, w3, w2)
    return jax.lax.psum(y, TENSOR_AXIS) if tensor_split else y


def _combine(y_flat, weight_tk):
    tokens, top_k = weight_tk.shape
    return jnp.einsum("tkd,tk->td", y_flat.reshape(tokens, top_k, -1), weight_tk.astype(y_flat.dtype))


def _padded(x_td, expert_idx_tk, weight_tk, w1, w3, w2, *, dispatch, n_shards, capacity, tensor_split):
    """Fixed [n_shards, capacity] buffers exchanged whole with all_to_all."""
    top_k = expert_idx_tk.shape[1]
    flat_e = expert_idx_tk.reshape(-1)  # [T*k]
    dest, local_expert = flat_e // w1.shape[0], flat_e % w1.shape[0]
    position = _positions(dest, n_shards)
    size = n_shards * capacity
    slot = jnp.where(position < capacity, dest * capacity + position, size)  # size: dropped
    send_x = _scatter(jnp.repeat(x_td, top_k, axis=0), slot, size)  # [n_shards * capacity, D]
    send_e = _scatter(local_expert.astype(jnp.int32), slot, size)
    send_valid = _scatter(jnp.ones(flat_e.shape, jnp.int32), slot, size)
    exchange = functools.partial(jax.lax.all_to_all, axis_name=EXPERT_AXIS, split_axis=0, concat_axis=0, tiled=True)
    y = _run_experts(dispatch, exchange(send_x), exchange(send_e), exchange(send_valid), w1, w3, w2, tensor_split)
    back = exchange(y)  # [n_shards * capacity, D], aligned with the send buffer
    y_copies = jnp.concatenate([back, jnp.zeros((1, back.shape[1]), back.dtype)])[slot]  # dropped -> 0
    return _combine(y_copies, weight_tk), jnp.zeros((), jnp.float32)


def _ragged_plan(send_counts, rows: int):
    """Offsets and sizes of every (source, destination) slice from the [n_shards] counts this
    device sends: receivers fill their `rows` from source 0 upward; what does not fit stays."""
    counts = jax.lax.all_gather(send_counts, EXPERT_AXIS)  # [source, destination]
    start = jnp.cumsum(counts, axis=0) - counts  # where each slice would begin at its receiver
    sent = jnp.clip(rows - start, 0, counts)  # what fits
    recv_start = jnp.cumsum(sent, axis=0) - sent  # [source, destination]
    send_start = jnp.cumsum(counts, axis=1) - counts  # each source's copies sorted by destination
    return counts, sent, recv_start, send_start


def _ragged(x_td, expert_idx_tk, weight_tk, w1, w3, w2, *, dispatch, n_shards, capacity, buffer_rows, tensor_split):
    """Only the routed copies travel (jax.lax.ragged_all_to_all; emulated on CPU), into
    receive buffers of `buffer_rows`; copies that do not fit are counted and add zero."""
    copies = expert_idx_tk.size
    per_shard = w1.shape[0]
    flat_e = expert_idx_tk.reshape(-1)  # [T*k]
    dest = flat_e // per_shard
    kept = _positions(dest, n_shards) < capacity  # model.capacity_factor's drops, as in the padded buffers
    order = jnp.argsort(jnp.where(kept, flat_e, n_shards * per_shard), stable=True)  # by destination, dropped last
    send_counts = jnp.bincount(jnp.where(kept, dest, n_shards), length=n_shards).astype(jnp.int32)
    counts, sent, recv_start, send_start = _ragged_plan(send_counts, buffer_rows)
    me = jax.lax.axis_index(EXPERT_AXIS)
    exchange = functools.partial(collectives.ragged_all_to_all, axis_name=EXPERT_AXIS)
    forward = lambda a, out: exchange(a, out, send_start[me], sent[me], recv_start[me], sent[:, me])
    top_k = expert_idx_tk.shape[1]
    recv_x = forward(x_td[order // top_k], jnp.zeros((buffer_rows, x_td.shape[1]), x_td.dtype))
    recv_e = forward((flat_e % per_shard).astype(jnp.int32)[order], jnp.zeros((buffer_rows,), jnp.int32))
    valid = jnp.arange(buffer_rows) < jnp.sum(sent[:, me])
    y = _run_experts(dispatch, recv_x, recv_e, valid, w1, w3, w2, tensor_split)  # [buffer_rows, D]
    back = exchange(
        y, jnp.zeros((copies, y.shape[1]), y.dtype), recv_start[:, me], sent[:, me], send_start[:, me], sent[me]
    )  # in `order`
    y_flat = jnp.zeros_like(back).at[order].set(back, unique_indices=True)
    overflow = jnp.sum(counts[me] - sent[me]).astype(jnp.float32)
    return _combine(y_flat, weight_tk), overflow


def buffer_rows(copies: int, n_shards: int, capacity_factor, buffer_factor) -> int:
    """Receive-buffer rows of the ragged exchange: n_shards x capacity (never overflows),
    or model.ep_buffer_factor x this device's copies when that is smaller."""
    bound = n_shards * _capacity(copies, n_shards, capacity_factor)
    return bound if buffer_factor is None else max(1, min(bound, math.ceil(buffer_factor * copies)))


def _keys_per_shard(weights, batch_axes: tuple[str, ...]):
    """Every PRNG key among the weights (LoRA dropout's) folded with this device's index over
    the batch axes: devices that hold different tokens draw different masks, while the
    devices of one `tensor` group, which hold the same tokens, draw the same ones."""
    if not batch_axes:
        return weights
    index = jax.lax.axis_index(batch_axes)
    is_key = lambda leaf: hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    return jax.tree_util.tree_map(lambda leaf: jax.random.fold_in(leaf, index) if is_key(leaf) else leaf, weights)


def _local(x_btd, expert_idx_btk, weight_btk, w1, w3, w2, *, batch_axes=(), **exchange_args):
    """One device's tokens [rows, seq / context, ...], flattened for the exchange."""
    w1, w3, w2 = _keys_per_shard((w1, w3, w2), batch_axes)
    rows, seq = x_btd.shape[:2]
    flat = (a.reshape(rows * seq, a.shape[-1]) for a in (x_btd, expert_idx_btk, weight_btk))
    y, overflow = _exchange_and_run(*flat, w1, w3, w2, **exchange_args)
    return y.reshape(rows, seq, -1), overflow


def _exchange_and_run(
    x_td,
    expert_idx_tk,
    weight_tk,
    w1,
    w3,
    w2,
    *,
    dispatch,
    n_shards,
    capacity_factor,
    buffer_factor,
    exchange,
    tensor_split,
):
    """The copies of this device's tokens [tokens, ...] through their experts and back."""
    if n_shards == 1:  # every expert is here: dispatch this device's tokens directly
        y = dispatch(x_td, expert_idx_tk, weight_tk, w1, w3, w2)
        return (jax.lax.psum(y, TENSOR_AXIS) if tensor_split else y), jnp.zeros((1,), jnp.float32)
    copies = expert_idx_tk.size
    fn = functools.partial(
        _padded,
        dispatch=dispatch,
        n_shards=n_shards,
        tensor_split=tensor_split,
        capacity=_capacity(copies, n_shards, capacity_factor),
    )
    if exchange == "ragged":
        fn = functools.partial(
            _ragged, **fn.keywords, buffer_rows=buffer_rows(copies, n_shards, capacity_factor, buffer_factor)
        )
    y, overflow = fn(x_td, expert_idx_tk, weight_tk, w1, w3, w2)
    return y, overflow[None]


def plain_weight_spec(w, spec, a_spec, b_spec):
    """The shard_map spec of a plain expert weight: `spec` (a_spec, b_spec: the specs of a
    low-rank pair beside it, for weight types that carry one)."""
    return spec


def dispatch(
    mesh,
    x_td,
    expert_idx_tk,
    weight_tk,
    w1,
    w3,
    w2,
    *,
    local_dispatch,
    capacity_factor=None,
    buffer_factor=None,
    exchange="ragged",
    weight_spec=plain_weight_spec,
):
    """(the expert-parallel MoE output [rows, seq, d_model] for tokens [rows, seq, ...] split
    over the batch axes and `context` (or [tokens, d_model] for tokens [tokens, ...] split
    over the batch axes), the token copies the ragged exchange's receive buffers could not
    hold).

    weight_spec(w, spec, a_spec, b_spec) gives the shard_map spec of each expert weight; the
    model passes one that knows its weight types (LoRA-adapted, quantized)."""
    shape = dict(mesh.shape)
    batch = tuple(a for a in BATCH_AXES if a in shape)
    flat = x_td.ndim == 2  # [tokens, ...]: rows of one token each
    context = CONTEXT_AXIS if shape.get(CONTEXT_AXIS, 1) > 1 and not flat else None
    split = batch + ((context,) if context else ())
    tensor_split = shape.get(TENSOR_AXIS, 1) > 1
    tensor = TENSOR_AXIS if tensor_split else None
    fn = functools.partial(
        _local,
        dispatch=local_dispatch,
        n_shards=shape.get(EXPERT_AXIS, 1),
        capacity_factor=capacity_factor,
        buffer_factor=buffer_factor,
        exchange=exchange,
        tensor_split=tensor_split,
        batch_axes=split,
    )
    expert = EXPERT_AXIS if EXPERT_AXIS in shape else None
    specs_in = (P(expert, None, tensor), P(expert, None, None), P(expert, None, tensor))  # w1, w3: W, A, B
    specs_out = (P(expert, tensor, None), P(expert, tensor, None), P(expert, None, None))  # w2
    w_specs = (weight_spec(w1, *specs_in), weight_spec(w3, *specs_in), weight_spec(w2, *specs_out))
    tokens = [a[:, None] if flat else a for a in (x_td, expert_idx_tk, weight_tk)]
    tokens_spec = P(batch, context)
    y, overflow = jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(tokens_spec, tokens_spec, tokens_spec, *w_specs),
        out_specs=(tokens_spec, P(split)),
        check_vma=False,
    )(*tokens, w1, w3, w2)
    return (y[:, 0] if flat else y), jnp.sum(overflow)
