"""Expert parallelism: token copies travel to the devices that hold their experts and back.

Used by the MoE block under any multi-device mesh (with an `expert` axis of 1, each device
simply dispatches its own tokens to its full set of experts). Each
device of the `expert` axis holds n_experts / n_shards experts (whole experts; their
d_model dimension gathered over `fsdp`, their d_ff dimension split over `tensor`).

Per device, inside shard_map:
    1. route its own tokens (done before, on the sharded batch), flatten to T*k copies
    2. place each copy in the send buffer of its destination shard: [n_shards, capacity, D]
    3. all_to_all over `expert`: every device now holds the copies for its experts
    4. run its experts on them (the configured local dispatch, e.g. sort + grouped matmul)
    5. psum over `tensor` (d_ff was split), all_to_all back, weight, sum over k
Dropless by default: capacity = T*k per destination, so no copy is ever dropped (the
buffers are n_shards times the worst-case need). With model.capacity_factor = c, the
capacity is ceil(c * T*k / n_shards) and copies beyond it are dropped (output 0).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe.model.lora import Adapted
from moe.quant.qarray import QArray
from moe.sharding import BATCH_AXES

EXPERT_AXIS, TENSOR_AXIS = "expert", "tensor"


def active_mesh():
    """The mesh set with jax.set_mesh, or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def wants_shard_map(mesh, n_tokens: int) -> bool:
    """True under a multi-device mesh, for token counts that split over the batch axes
    (shape-only traces such as init with one token use the plain dispatch). Without it,
    the compiler may replicate the sort-based dispatch on every device of the batch."""
    if mesh is None or mesh.size == 1:
        return False
    shards = math.prod(size for axis, size in dict(mesh.shape).items() if axis in BATCH_AXES)
    return n_tokens % shards == 0


def _send_slots(expert_idx_tk, experts_per_shard: int, n_shards: int, capacity: int):
    """For each token copy: its slot in the flat send buffer [n_shards * capacity]
    (n_shards * capacity means dropped) and its expert's index on the destination."""
    flat_e = expert_idx_tk.reshape(-1)  # [T*k]
    dest = flat_e // experts_per_shard
    onehot = jax.nn.one_hot(dest, n_shards, dtype=jnp.int32)  # [T*k, n_shards]
    position = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - 1, dest[:, None], axis=1)[:, 0]
    slot = jnp.where(position < capacity, dest * capacity + position, n_shards * capacity)
    return slot, flat_e % experts_per_shard


def _scatter(values, slot, size):
    """values [n, ...] into a zero buffer [size, ...] at `slot` (slot == size drops)."""
    buffer = jnp.zeros((size + 1, *values.shape[1:]), values.dtype)
    return buffer.at[slot].set(values, unique_indices=False)[:size]


def _local(x_td, expert_idx_tk, weight_tk, w1, w3, w2, *, dispatch, n_shards, capacity_factor, tensor_split):
    if n_shards == 1:  # every expert is here: dispatch this device's tokens directly
        y = dispatch(x_td, expert_idx_tk, weight_tk, w1, w3, w2)
        return jax.lax.psum(y, TENSOR_AXIS) if tensor_split else y
    tokens, top_k = expert_idx_tk.shape
    copies = tokens * top_k
    capacity = copies if capacity_factor is None else max(1, math.ceil(capacity_factor * copies / n_shards))
    size = n_shards * capacity
    slot, local_expert = _send_slots(expert_idx_tk, w1.shape[0], n_shards, capacity)
    send_x = _scatter(jnp.repeat(x_td, top_k, axis=0), slot, size)  # [n_shards * capacity, D]
    send_e = _scatter(local_expert.astype(jnp.int32), slot, size)
    send_valid = _scatter(jnp.ones((copies,), jnp.int32), slot, size)

    exchange = functools.partial(jax.lax.all_to_all, axis_name=EXPERT_AXIS, split_axis=0, concat_axis=0, tiled=True)
    recv_x, recv_e, recv_valid = exchange(send_x), exchange(send_e), exchange(send_valid)
    y = dispatch(recv_x, recv_e[:, None], recv_valid[:, None].astype(x_td.dtype), w1, w3, w2)
    if tensor_split:
        y = jax.lax.psum(y, TENSOR_AXIS)
    back = exchange(y)  # [n_shards * capacity, D], aligned with the send buffer
    y_copies = jnp.concatenate([back, jnp.zeros((1, back.shape[1]), back.dtype)])[slot]  # dropped -> 0
    return jnp.einsum("tkd,tk->td", y_copies.reshape(tokens, top_k, -1), weight_tk.astype(back.dtype))


def dispatch(mesh, x_td, expert_idx_tk, weight_tk, w1, w3, w2, *, local_dispatch, capacity_factor):
    """The expert-parallel MoE output [tokens, d_model] for tokens sharded over the batch axes."""
    shape = dict(mesh.shape)
    batch = tuple(a for a in BATCH_AXES if a in shape)
    tensor_split = shape.get(TENSOR_AXIS, 1) > 1
    tensor = TENSOR_AXIS if tensor_split else None
    fn = functools.partial(_local, dispatch=local_dispatch, n_shards=shape.get(EXPERT_AXIS, 1),
                           capacity_factor=capacity_factor, tensor_split=tensor_split)
    tokens_spec = P(batch)
    expert = EXPERT_AXIS if EXPERT_AXIS in shape else None
    specs_in = (P(expert, None, tensor), P(expert, None, None), P(expert, None, tensor))  # w1, w3: W, A, B
    specs_out = (P(expert, tensor, None), P(expert, tensor, None), P(expert, None, None))  # w2
    w_specs = (_weight_spec(w1, *specs_in), _weight_spec(w3, *specs_in), _weight_spec(w2, *specs_out))
    return jax.shard_map(
        fn, mesh=mesh,
        in_specs=(tokens_spec, tokens_spec, tokens_spec, *w_specs),
        out_specs=tokens_spec, check_vma=False,
    )(x_td, expert_idx_tk, weight_tk, w1, w3, w2)


def _weight_spec(w, spec, a_spec, b_spec):
    """The shard_map spec of an expert weight, or of a LoRA-adapted one (its pair split over
    experts alike; the rank dimension whole, and A's rows split over `tensor` as W's are for
    w2, whose partial products the final psum over `tensor` adds up)."""
    if isinstance(w, Adapted):
        return w.replace(w=_weight_spec(w.w, spec, None, None), a=a_spec, b=b_spec,
                         key=None if w.key is None else P())
    if isinstance(w, QArray):  # quantized: split over experts only, each expert's codes whole
        return jax.tree_util.tree_map(lambda _: P(spec[0]), w)
    return spec
