"""Context parallelism: attention over a sequence split into contiguous shards.

Under a mesh with `context` > 1 every activation is [batch, seq / context, ...] on each
device (the rules map activation_length to `context`), and everything but attention is
per token. Attention runs here, inside shard_map, with each device's queries and one of
three ways of reaching the keys it needs:

    all_gather  every shard's keys and values gathered over `context` (their gradients
                reduce-scattered back); queries stay local.
    ring        key/value blocks passed around the `context` ring with ppermute, one hop
                per step, each block's scores combined with the running ones by an online
                (log-sum-exp) softmax; the forward holds two blocks at a time (the
                backward keeps every step's, as all_gather keeps the whole sequence).
    halo        sliding-window layers (model.sliding_window W < seq): a shard's queries
                reach back at most W - 1 positions, so it receives only the W - 1 keys and
                values before its first position, from as many left neighbours as hold
                them (ceil((W - 1) / shard)). O(W) per layer whatever the context size.

model.context_parallel picks all_gather or ring for causal layers; sliding-window layers
take the halo whenever it is shorter than the whole sequence. Masks are attention_mask's
over absolute indices, so packed documents (segment ids travel with the keys) and RoPE
(positions are rotated before, per token) are exact across shard boundaries.

Nothing here knows the model: the local attention is passed in (moe/model/attention.py's
dot_product_attention), as the MoE block passes its dispatch to expert_parallel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe.parallel.mesh import BATCH_AXES, CONTEXT_AXIS, TENSOR_AXIS, splits_evenly


def size(mesh) -> int:
    """The number of sequence shards of `mesh` (1 without a mesh or a context axis)."""
    return 1 if mesh is None else dict(mesh.shape).get(CONTEXT_AXIS, 1)


def applies(mesh, rows: int, seq: int) -> bool:
    """Whether attention over [rows, seq] takes this file's path: a mesh with `context` > 1
    that the rows and the sequence divide over (shape-only traces, such as init on one
    token, take the plain path; a training sequence that does not divide is refused
    earlier, by mesh.check_divisibility)."""
    return size(mesh) > 1 and splits_evenly(mesh, rows, seq)


def resolve(strategy: str) -> str:
    """model.context_parallel: "auto" is all_gather, which the 32k TPU plans found no worse
    than ring in memory and faster in the roofline up to 8 shards (docs/context.md); ring
    is for sequences whose gathered keys a chip cannot hold."""
    return "all_gather" if strategy == "auto" else strategy


def uses_halo(window: int | None, seq: int) -> bool:
    """Whether a layer of this window takes the halo exchange on a sequence of `seq`."""
    return window is not None and window < seq


def halo_pieces(window: int, shard: int) -> list[int]:
    """Rows received from the 1st, 2nd, ... left neighbour: the W - 1 keys before a shard."""
    need, pieces = window - 1, []
    while need > 0:
        pieces.append(min(shard, need))
        need -= pieces[-1]
    return pieces


def _shift(x, hops: int, n_shards: int, axis_name: str = CONTEXT_AXIS):
    """x of the device `hops` to the left along the ring; zeros where there is none."""
    return jax.lax.ppermute(x, axis_name, [(i, i + hops) for i in range(n_shards - hops)])


def _halo(q, k, v, seg, *, window, n_shards, local_attention):
    """This shard's queries against the W - 1 keys before it (from its left neighbours)
    and its own. Keys from before the sequence start have negative positions: masked."""
    shard = q.shape[1]
    me = jax.lax.axis_index(CONTEXT_AXIS)
    parts = {"k": [k], "v": [v], "seg": [seg]}
    for hops, rows in enumerate(halo_pieces(window, shard), start=1):
        for name, x in (("k", k), ("v", v), ("seg", seg)):
            if x is not None:
                parts[name].insert(0, _shift(x[:, shard - rows :], hops, n_shards))
    keys, values = jnp.concatenate(parts["k"], axis=1), jnp.concatenate(parts["v"], axis=1)
    k_seg = None if seg is None else jnp.concatenate(parts["seg"], axis=1)
    start = me * shard
    q_pos = (start + jnp.arange(shard))[None]
    k_pos = (start - (keys.shape[1] - shard) + jnp.arange(keys.shape[1]))[None]  # negative: before the sequence
    return local_attention(q, keys, values, q_pos, k_pos, window, seg, k_seg)


def _all_gather(q, k, v, seg, *, window, n_shards, local_attention):
    shard = q.shape[1]
    gather = functools.partial(jax.lax.all_gather, axis_name=CONTEXT_AXIS, axis=1, tiled=True)
    keys, values = gather(k), gather(v)
    k_seg = None if seg is None else gather(seg)
    q_pos = (jax.lax.axis_index(CONTEXT_AXIS) * shard + jnp.arange(shard))[None]
    return local_attention(q, keys, values, q_pos, jnp.arange(shard * n_shards)[None], window, seg, k_seg)


def _block_scores(q, k, v, mask):
    """One key block's unnormalized attention: (max [b, kv, g, q] (-inf where the block
    holds no key of the row), sum [b, kv, g, q], out [b, q, kv, g, d]) in float32, masked
    keys contributing nothing. The max only shifts the exponent: no gradient through it."""
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    scores = jnp.where(mask, scores, -jnp.inf)
    peak = jax.lax.stop_gradient(jnp.max(scores, axis=-1))
    safe = jnp.where(jnp.isfinite(peak), peak, 0.0)
    probs = jnp.where(mask, jnp.exp(scores - safe[..., None]), 0.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v).astype(jnp.float32)
    return peak, jnp.sum(probs, axis=-1), out


def _rescale(peak, new_peak):
    """exp(peak - new_peak), 0 where peak is -inf (nothing accumulated yet)."""
    return jnp.where(jnp.isfinite(peak), jnp.exp(peak - jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)), 0.0)


BLOCK_SCORES = 1024 * 4096  # a ring step's scores per head and row of the batch, at most
MIN_ROWS = 128


def _rows_per_block(shard: int, n_keys: int) -> int:
    """Query rows per piece of a ring step: the whole shard, or the largest divisor of it
    that keeps rows x keys within BLOCK_SCORES (at least MIN_ROWS)."""
    budget = max(MIN_ROWS, BLOCK_SCORES // n_keys)
    return next((r for r in range(min(budget, shard), 0, -1) if shard % r == 0), shard)


def _ring_step(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window, mask_fn):
    """_block_scores of one ring step, the queries in pieces of _rows_per_block rows, each
    recomputed in the backward pass: only one piece's scores are live at a time."""
    shard = q.shape[1]
    rows = _rows_per_block(shard, k.shape[1])
    if rows == shard:
        return _block_scores(q, k, v, mask_fn(q_pos, k_pos, window, q_seg, k_seg))
    pieces = lambda a: jnp.moveaxis(a.reshape(a.shape[0], shard // rows, rows, *a.shape[2:]), 1, 0)  # noqa: E731

    @jax.checkpoint
    def one(args):
        q_r, pos_r, seg_r = args
        return _block_scores(q_r, k, v, mask_fn(pos_r, k_pos, window, None if q_seg is None else seg_r, k_seg))

    seg = pieces(q_seg) if q_seg is not None else jnp.zeros((shard // rows,))
    peak, total, out = jax.lax.map(one, (pieces(q), pieces(q_pos), seg))
    joined = lambda a: jnp.moveaxis(a, 0, -2).reshape(*a.shape[1:-1], shard)  # [n, b, kv, g, rows] -> [b, kv, g, q]  # noqa: E731
    return joined(peak), joined(total), jnp.moveaxis(out, 0, 1).reshape(q.shape)


def _ring(q, k, v, seg, *, window, n_shards, mask_fn):
    """Online softmax over the blocks as they come round: step t holds the block of the
    device t to the left; each step's ppermute is issued before, and independent of, its
    scores, so the scheduler may overlap the next block's transfer with this block's work."""
    shard = q.shape[1]
    me = jax.lax.axis_index(CONTEXT_AXIS)
    q_pos = (me * shard + jnp.arange(shard))[None]
    ring = [(i, (i + 1) % n_shards) for i in range(n_shards)]
    b, _, n_kv, group, _ = q.shape
    peak = jnp.full((b, n_kv, group, shard), -jnp.inf, jnp.float32)
    total = jnp.zeros((b, n_kv, group, shard), jnp.float32)
    acc = jnp.zeros(q.shape, jnp.float32)
    block = (k, v, seg)
    to_q = lambda s: jnp.moveaxis(s, 3, 1)[..., None]  # [b, kv, g, q] -> [b, q, kv, g, 1]  # noqa: E731
    for step in range(n_shards):
        k_b, v_b, seg_b = block
        if step + 1 < n_shards:  # the next block sent before this one is used
            block = jax.tree_util.tree_map(lambda x: jax.lax.ppermute(x, CONTEXT_AXIS, ring), block)
        k_pos = (((me - step) % n_shards) * shard + jnp.arange(shard))[None]
        b_peak, b_total, b_out = _ring_step(q, k_b, v_b, q_pos, k_pos, seg, seg_b, window=window, mask_fn=mask_fn)
        new_peak = jnp.maximum(peak, b_peak)
        old_scale, b_scale = _rescale(peak, new_peak), _rescale(b_peak, new_peak)
        total = total * old_scale + b_total * b_scale
        acc = acc * to_q(old_scale) + b_out * to_q(b_scale)
        peak = new_peak
    return (acc / to_q(total)).astype(q.dtype)


def attention(mesh, q, k, v, seg, *, window, strategy, local_attention, mask_fn):
    """Self-attention of sequences split over the mesh's `context` axis.

    q [batch, seq, kv_heads, group, head_dim], k and v [batch, seq, kv_heads, head_dim],
    seg [batch, seq] or None, each sharded [batch axes, context, tensor (kv heads)].
    local_attention(q, k, v, q_pos, k_pos, window, q_seg, k_seg) attends one shard's
    queries to the keys given at absolute positions (negative: none); mask_fn is its mask
    (attention_mask), which the ring applies block by block."""
    shape = dict(mesh.shape)
    n_shards = shape[CONTEXT_AXIS]
    batch = tuple(a for a in BATCH_AXES if a in shape) or None
    heads = TENSOR_AXIS if shape.get(TENSOR_AXIS, 1) > 1 and k.shape[2] % shape[TENSOR_AXIS] == 0 else None
    if uses_halo(window, q.shape[1]):
        fn = functools.partial(_halo, window=window, n_shards=n_shards, local_attention=local_attention)
    elif resolve(strategy) == "ring":
        fn = functools.partial(_ring, window=window, n_shards=n_shards, mask_fn=mask_fn)
    else:
        fn = functools.partial(_all_gather, window=window, n_shards=n_shards, local_attention=local_attention)
    q_spec = P(batch, CONTEXT_AXIS, heads, None, None)
    kv_spec = P(batch, CONTEXT_AXIS, heads, None)
    seg_spec = P(batch, CONTEXT_AXIS)
    if seg is None:
        run = lambda q, k, v: fn(q, k, v, None)  # noqa: E731
        return jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False)(
            q, k, v
        )
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False
    )(q, k, v, seg)
