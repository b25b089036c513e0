"""Splash attention: jax's Pallas TPU flash-attention kernel (forward and backward, blocks of
the mask that are all masked skipped), for training and prefill without a cache.

    splash_attention(q, k, v, sliding_window, segment_ids) -> out
    # q [batch, seq, kv_heads, group, head_dim]; k, v [batch, seq, kv_heads, head_dim]

The same masks as moe/model/attention.py's reference, by index within the row: causal, or
the sliding window of exactly W keys (the query included), and packed documents through
segment ids. The kernel is chosen when the program is lowered: compiled on TPU, Pallas'
interpreter elsewhere (slow; for tests on CPU), so `moe aot` on a CPU host compiles the real
kernel into a TPU plan. Under a mesh it runs inside shard_map: the batch split over the
batch axes and heads over `tensor` (a custom kernel cannot be partitioned by the compiler).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

from moe.parallel import expert_parallel
from moe.parallel import mesh as mesh_lib
from moe.parallel.mesh import BATCH_AXES

LANES = 128  # the kernel's key blocks are whole multiples of the TPU's 128 lanes
BLOCK = 512  # query and key rows per block, at most


def supports(seq: int) -> bool:
    """Sequences the kernel takes: whole multiples of 128 rows."""
    return seq % LANES == 0


def _block(seq: int) -> int:
    return max(b for b in (BLOCK, 256, LANES) if seq % b == 0)


def _kernel(seq: int, heads: int, sliding_window: int | None, interpret: bool):
    """Made inside each trace: the mask's block tables become constants of that program
    (cached across traces they would leak tracers; made eagerly they would need a device)."""
    if sliding_window is None:
        one = mask_lib.CausalMask((seq, seq))
    else:  # key j is allowed for query i when i - (W - 1) <= j <= i
        one = mask_lib.LocalMask((seq, seq), window_size=(sliding_window - 1, 0), offset=0)
    block = _block(seq)
    sizes = kernel_lib.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return kernel_lib.make_splash_mha(
        mask_lib.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret
    )


def _attend(q, k, v, segment_ids, sliding_window):
    """One device's share: q [b, heads, seq, hd] (scaled), k, v [b, kv_heads, seq, hd]."""
    seq, heads = q.shape[2], q.shape[1]

    def run(interpret, q, k, v, seg):
        kernel = _kernel(seq, heads, sliding_window, interpret)
        if seg is None:
            return jax.vmap(kernel)(q, k, v)
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=kernel_lib.SegmentIds(s, s)))(q, k, v, seg)

    args = (q, k, v) if segment_ids is None else (q, k, v, segment_ids)
    pad = (None,) if segment_ids is None else ()
    return jax.lax.platform_dependent(
        *args, tpu=lambda *a: run(False, *a, *pad), default=lambda *a: run(True, *a, *pad)
    )


def splash_attention(q, k, v, sliding_window=None, segment_ids=None):
    """Causal (or sliding-window) attention within documents; q is scaled by head_dim^-0.5
    here and softmax runs in float32 inside the kernel."""
    batch, seq, n_kv, group, hd = q.shape
    q_bhsd = (q.astype(jnp.float32) * hd**-0.5).astype(q.dtype).reshape(batch, seq, n_kv * group, hd)
    q_bhsd = q_bhsd.transpose(0, 2, 1, 3)  # [batch, heads, seq, head_dim]; head h uses kv head h // group
    k_bhsd, v_bhsd = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [batch, kv_heads, seq, head_dim]
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    fn = functools.partial(_attend, sliding_window=sliding_window)
    mesh = mesh_lib.active_mesh()
    if expert_parallel.wants_shard_map(mesh, batch):  # a multi-device mesh the batch divides over
        shape = dict(mesh.shape)
        rows = tuple(a for a in BATCH_AXES if a in shape)
        heads = "tensor" if shape.get("tensor", 1) > 1 and n_kv % shape["tensor"] == 0 else None
        spec, seg_spec = P(rows, heads, None, None), P(rows, None)
        fn = jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=(spec, spec, spec, None if seg is None else seg_spec),
            out_specs=spec,
            check_vma=False,
        )
    out = fn(q_bhsd, k_bhsd, v_bhsd, seg)  # [batch, heads, seq, head_dim]
    return out.transpose(0, 2, 1, 3).reshape(batch, seq, n_kv, group, hd)
