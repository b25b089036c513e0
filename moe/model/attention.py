"""Grouped-query attention with causal, sliding-window and document (segment) masks, and an
optional KV cache (moe/model/kv_cache.py) for decoding: one implementation for both.

Masks are built from absolute positions, so the same code serves a training batch (query
and key positions 0..seq-1) and a cache whose slots hold any positions (-1: empty). Long
query sequences are processed in blocks of QUERY_CHUNK rows (fewer against more than
SCORE_KEYS keys), each recomputed in the backward pass, so [seq, keys] scores are never
materialized, forward or backward: one block's at a time. A
sequence attending to itself (no cache: training, perplexity) goes in blocks of
CAUSAL_BLOCK query rows that skip the key blocks its mask hides (causal_self_attention).

model.attention picks the implementation without a cache: "xla" (this file's), "splash"
(moe/model/splash.py: jax's Pallas flash-attention kernel for TPU, the same masks), "cudnn"
(cuDNN's fused flash attention through jax.nn.dot_product_attention: GPU, 16-bit dtypes)
or "auto": splash on TPU for sequences it takes, cudnn on GPU in bfloat16/float16, else
xla. Decoding with a cache is always xla. Under a mesh that splits the sequence
(mesh.context > 1), attention goes through moe/parallel/context.py, which runs this file's
dot_product_attention on each shard.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from moe.config import LoRAConfig, ModelConfig
from moe.model import splash
from moe.model.layers import DTYPES, RMSNorm, apply_rope, kernel_init, param_with_axes
from moe.model.lora import adapt, project
from moe.parallel import context
from moe.parallel import mesh as mesh_lib

QUERY_CHUNK = 1024  # queries per block when a sequence is longer than this
SCORE_KEYS = 4096  # ... against up to this many keys; fewer rows per block against more
MIN_QUERY_CHUNK = 128
CAUSAL_BLOCK = 128  # query rows per block of training self-attention (fewer: one block)
MAX_CAUSAL_BLOCKS = 16  # longer sequences take longer blocks, up to QUERY_CHUNK rows


def resolve(name: str, backend: str | None = None, dtype: str = "float32") -> str:
    """The attention implementation for `name` ("auto": splash on TPU, cudnn on GPU in the
    16-bit dtypes cuDNN's fused kernel takes, else xla)."""
    if name != "auto":
        return name
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "splash"
    return "cudnn" if backend == "gpu" and dtype in ("bfloat16", "float16") else "xla"


def fused_attention(q, k, v, sliding_window: int | None, seg=None, implementation: str = "cudnn"):
    """jax.nn.dot_product_attention with the training masks (query and key i at position i):
    causal, a W-key window (W - 1 keys to the left of the query), packed documents (a
    boolean mask: same segment id, padding id 0 with itself, as attention_mask). Shapes as
    dot_product_attention; "cudnn" is cuDNN's flash attention (GPU), "xla" jax's own
    lowering of the same call (how the mask mapping is tested off GPU)."""
    batch, seq, n_kv, group, head_dim = q.shape
    mask = None if seg is None else (seg[:, None, :, None] == seg[:, None, None, :])  # [batch, 1, q, k]
    window = None if sliding_window is None else (sliding_window - 1, 0)
    out = jax.nn.dot_product_attention(
        q.reshape(batch, seq, n_kv * group, head_dim),
        k,
        v,
        mask=mask,
        is_causal=True,
        local_window_size=window,
        implementation=implementation,
    )
    return out.reshape(q.shape)


def attention_mask(q_pos, k_pos, sliding_window: int | None, q_seg=None, k_seg=None):
    """Boolean [batch or 1, 1, 1, q, k]: query i may attend to key j.

    q_pos [batch or 1, q], k_pos [batch or 1, k]: absolute positions (-1: padding or an
    empty cache slot, never attended). Causal: k_pos <= q_pos. Sliding window W:
    q_pos - W < k_pos, so exactly W keys, the query itself included. Segments: only keys
    of the same document (packed sequences never attend across).
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    allowed = (kp >= 0) & (kp <= qp)
    if sliding_window is not None:
        allowed = allowed & (kp > qp - sliding_window)
    if q_seg is not None:
        allowed = allowed & (q_seg[:, :, None] == k_seg[:, None, :])
    return allowed[:, None, None]  # [batch, 1, 1, q, k]


# einsum operand layouts: "seq" is the model's ([batch, q, kv, group, head_dim] queries,
# [batch, s, kv, head_dim] keys), "heads" puts the heads first ([batch, kv, group, q, head_dim],
# [batch, kv, s, head_dim]): every product then has its batch dims leading, no transposes
LAYOUTS = {"seq": ("bqkgd", "bskd"), "heads": ("bkgqd", "bksd")}
SCORES = "bkgqs"


def _probs(q, k, mask, layout: str):
    """float32 softmax of the masked, scaled scores: [batch, kv, group, q, s]."""
    Q, K = LAYOUTS[layout]
    scores = jnp.einsum(f"{Q},{K}->{SCORES}", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    return nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend_block(q, k, v, mask, layout: str = "seq"):
    return _attend_fwd(q, k, v, mask, layout)[0]


def _attend_fwd(q, k, v, mask, layout: str):
    Q, K = LAYOUTS[layout]
    probs = _probs(q, k, mask, layout)
    out = jnp.einsum(f"{SCORES},{K}->{Q}", probs.astype(v.dtype), v)
    return out, (q, k, v, mask, probs, out)


def _attend_bwd(layout, residuals, dout):
    """The softmax gradient as flash attention takes it: rowsum(dprobs * probs) is
    rowsum(dout * out), a sum over head_dim instead of keys; masked keys get nothing."""
    Q, K = LAYOUTS[layout]
    q, k, v, mask, probs, out = residuals
    dv = jnp.einsum(f"{SCORES},{Q}->{K}", probs.astype(v.dtype), dout)
    dprobs = jnp.einsum(f"{Q},{K}->{SCORES}", dout, v).astype(jnp.float32)
    row = jnp.einsum(f"{Q},{Q}->{SCORES[:-1]}", dout.astype(jnp.float32), out.astype(jnp.float32))
    dscores = jnp.where(mask, probs * (dprobs - row[..., None]), 0.0) * q.shape[-1] ** -0.5
    dscores = dscores.astype(q.dtype)
    dq = jnp.einsum(f"{SCORES},{K}->{Q}", dscores, k)
    dk = jnp.einsum(f"{SCORES},{Q}->{K}", dscores, q)
    return dq, dk, dv, None


_attend_block.defvjp(_attend_fwd, _attend_bwd)


def query_chunk(n_keys: int, chunk: int = QUERY_CHUNK) -> int:
    """Query rows per block against `n_keys` keys: `chunk`, fewer when the keys are many,
    so a block's scores hold at most chunk x SCORE_KEYS entries per head."""
    return min(chunk, max(MIN_QUERY_CHUNK, chunk * SCORE_KEYS // max(n_keys, 1)))


def dot_product_attention(q, k, v, q_pos, k_pos, sliding_window=None, q_seg=None, k_seg=None, chunk: int = QUERY_CHUNK):
    """q: [batch, q, kv_heads, group, head_dim]; k, v: [batch, s, kv_heads, head_dim].

    Query head h = kv * group + g uses kv head kv (h // group). Softmax in float32. Masks
    as attention_mask; queries longer than a block (query_chunk(s, chunk) rows) go in
    blocks (padded at the end), each rematerialized in the backward pass, so only one
    block's scores are ever live.
    """
    n_q = q.shape[1]
    chunk = query_chunk(k.shape[1], chunk)
    if n_q <= chunk:
        return _attend_block(q, k, v, attention_mask(q_pos, k_pos, sliding_window, q_seg, k_seg))
    n_blocks = -(-n_q // chunk)
    pad = n_blocks * chunk - n_q

    def blocks(a, fill=0):  # [b, n_q, ...] -> [n_blocks, b, chunk, ...]
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
        return jnp.moveaxis(a.reshape(a.shape[0], n_blocks, chunk, *a.shape[2:]), 1, 0)

    has_seg = q_seg is not None
    xs = (blocks(q), blocks(q_pos, -1), blocks(q_seg) if has_seg else jnp.zeros((n_blocks,)))

    @jax.checkpoint
    def one(args):
        q_b, pos_b, seg_b = args
        mask = attention_mask(pos_b, k_pos, sliding_window, seg_b if has_seg else None, k_seg)
        return _attend_block(q_b, k, v, mask)

    out = jax.lax.map(one, xs)  # [n_blocks, b, chunk, kv, group, head_dim]
    out = jnp.moveaxis(out, 0, 1).reshape(q.shape[0], n_blocks * chunk, *q.shape[2:])
    return out[:, :n_q]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def row_windows(x, windows: tuple, axis: int):
    """x[start:stop] along `axis` for each (start, stop) in `windows` (static). The backward
    pass concatenates the pieces' gradients when the windows tile the axis in order, and
    adds each into its rows otherwise, instead of summing one zero-padded full-size
    gradient per window (what slicing's own transpose builds)."""
    return tuple(lax.slice_in_dim(x, start, stop, axis=axis) for start, stop in windows)


def _row_windows_fwd(x, windows, axis):
    return row_windows(x, windows, axis), x.shape


def _row_windows_bwd(windows, axis, shape, pieces):
    tiled = all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    if tiled and windows[0][0] == 0 and windows[-1][1] == shape[axis]:
        return (jnp.concatenate(pieces, axis=axis),)
    total = jnp.zeros(shape, pieces[0].dtype)
    for (start, _), piece in zip(windows, pieces):
        total = lax.dynamic_update_slice_in_dim(
            total, lax.dynamic_slice_in_dim(total, start, piece.shape[axis], axis) + piece, start, axis
        )
    return (total,)


row_windows.defvjp(_row_windows_fwd, _row_windows_bwd)


def causal_self_attention(q, k, v, index, sliding_window=None, seg=None, block: int | None = None):
    """Self-attention of whole sequences, query and key i at index i (training, perplexity):
    dot_product_attention's result, with the work a causal mask discards skipped. Queries go
    in blocks of `block` rows (more rows when the sequence has over MAX_CAUSAL_BLOCKS blocks),
    and each block meets only the keys from the first its window can reach (index
    start - W + 1) to its own last row: key blocks wholly in its future or before its window
    are masked anyway. For n blocks that is (n + 1) / 2n of the [seq, seq] scores without a
    window. index [1 or batch, seq]; the masks inside each block are attention_mask's. The
    blocks work heads-first (q, k, v transposed once here, not once per block and product)
    and are cut by row_windows, whose backward builds no zero-padded gradient per block."""
    n_q = q.shape[1]
    block = max(block or CAUSAL_BLOCK, -(-n_q // MAX_CAUSAL_BLOCKS))
    if n_q <= block or block > QUERY_CHUNK:  # one block, or too long to unroll: the plain path
        return dot_product_attention(q, k, v, index, index, sliding_window, seg, seg)
    rows = tuple((start, min(n_q, start + block)) for start in range(0, n_q, block))
    keys = tuple((0 if sliding_window is None else max(0, start - sliding_window + 1), stop) for start, stop in rows)
    q_heads = jnp.moveaxis(q, 1, 3)  # [batch, kv_heads, group, seq, head_dim]: transposed once, not per block
    k_heads, v_heads = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)  # [batch, kv_heads, seq, head_dim]
    outs = []
    for (start, stop), (first, _), q_b, k_b, v_b in zip(
        rows, keys, row_windows(q_heads, rows, 3), row_windows(k_heads, keys, 2), row_windows(v_heads, keys, 2)
    ):
        mask = attention_mask(
            index[:, start:stop],
            index[:, first:stop],
            sliding_window,
            None if seg is None else seg[:, start:stop],
            None if seg is None else seg[:, first:stop],
        )
        outs.append(_attend_block(q_b, k_b, v_b, mask, "heads"))
    return jnp.moveaxis(jnp.concatenate(outs, axis=3), 3, 1)  # [batch, seq, kv_heads, group, head_dim]


class Attention(nn.Module):
    """attn: {"q_pos", "k_pos"} (and "q_seg", "k_seg" for packed documents), from
    Transformer; without kv both are the index [1, seq] (the sequence attends to itself,
    RoPE takes the real positions). With kv (this layer's cache {"k", "v"} [batch, slots, kv_heads, head_dim])
    and attn["slot"] [batch, seq] (where each new key goes; slots: dropped), returns
    (out, updated kv). `append`: attend to the cache as it was plus the new keys, then
    write (a sliding-window ring filled by a chunk that overwrites keys its own queries
    still need); otherwise write first and attend to the cache."""

    cfg: ModelConfig
    append: bool = False
    lora: LoRAConfig | None = None  # adapters on the targeted projections (moe/model/lora.py)

    def _weight(self, name, shape, axes, n_in, select):
        pdt = DTYPES[self.cfg.param_dtype]
        w = param_with_axes(self, name, kernel_init(self.cfg), shape, axes, pdt)
        w = adapt(self, name, w, self.lora, n_lead=0, n_in=n_in, axes=axes, dtype=pdt, select=select)
        return w.astype(DTYPES[self.cfg.dtype])

    @nn.compact
    def __call__(self, x, cos, sin, attn, kv=None, select=None):  # x: [batch, seq, d_model]
        cfg, dtype = self.cfg, DTYPES[self.cfg.dtype]
        d, h, n_kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        select = None if select is None else select[:, None, :]  # [batch, 1, rank]: a row's adapter columns
        wq = self._weight("q", (d, h, hd), ("embed", "heads", "head_dim"), 1, select)
        wk = self._weight("k", (d, n_kv, hd), ("embed", "kv_heads", "head_dim"), 1, select)
        wv = self._weight("v", (d, n_kv, hd), ("embed", "kv_heads", "head_dim"), 1, select)
        wo = self._weight("o", (h, hd, d), ("heads", "head_dim", "embed"), 2, select)
        x = x.astype(dtype)
        q = project(x, wq, 1)  # [batch, seq, heads, head_dim]
        k = project(x, wk, 1)  # [batch, seq, kv_heads, head_dim]
        v = project(x, wv, 1)
        if cfg.qk_norm:  # each head's query and key RMS-normalized over head_dim (Qwen3, OLMoE)
            q, k = RMSNorm(cfg, name="q_norm")(q), RMSNorm(cfg, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        batch, seq = x.shape[:2]
        q = q.reshape(batch, seq, n_kv, h // n_kv, hd)  # [batch, seq, kv_heads, group, head_dim]
        keys, values = k, v
        if kv is not None:
            rows = jnp.arange(batch)[:, None]
            written = {
                "k": kv["k"].at[rows, attn["slot"]].set(k.astype(kv["k"].dtype), mode="drop"),
                "v": kv["v"].at[rows, attn["slot"]].set(v.astype(kv["v"].dtype), mode="drop"),
            }
            if self.append:
                keys = jnp.concatenate([kv["k"], k.astype(kv["k"].dtype)], axis=1)
                values = jnp.concatenate([kv["v"], v.astype(kv["v"].dtype)], axis=1)
            else:
                keys, values = written["k"], written["v"]
        impl = resolve(cfg.attention, dtype=cfg.dtype)
        mesh = mesh_lib.active_mesh() if kv is None else None
        if context.applies(mesh, batch, seq):  # the sequence split over mesh.context: moe/parallel/context.py
            out = context.attention(
                mesh,
                q,
                k,
                v,
                attn.get("q_seg"),
                window=cfg.sliding_window,
                strategy=cfg.context_parallel,
                local_attention=dot_product_attention,
                mask_fn=attention_mask,
            )
        elif kv is None and impl == "splash" and splash.supports(seq):
            out = splash.splash_attention(q, k, v, cfg.sliding_window, attn.get("q_seg"))  # index-based masks
        elif kv is None and impl == "cudnn":
            out = fused_attention(q, k, v, cfg.sliding_window, attn.get("q_seg"))  # index-based masks
        elif kv is None:  # the sequence attends to itself: index masks, future key blocks skipped
            out = causal_self_attention(q, k, v, attn["q_pos"], cfg.sliding_window, attn.get("q_seg"))
        else:
            out = dot_product_attention(
                q,
                keys.astype(dtype),
                values.astype(dtype),
                attn["q_pos"],
                attn["k_pos"],
                cfg.sliding_window,
                attn.get("q_seg"),
                attn.get("k_seg"),
            )
        out = project(out.reshape(batch, seq, h, hd), wo, 2)  # [batch, seq, d_model]
        return out if kv is None else (out, written)
