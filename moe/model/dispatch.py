"""Dispatch strategies for the MoE block, all behind one signature.

    dispatch(x_td, expert_idx_tk, weight_tk, w1_edf, w3_edf, w2_efd, *, recompute_gated=True) -> y_td

x_td: [tokens, d_model] in the compute dtype; expert_idx_tk: [tokens, top_k] int32;
weight_tk: [tokens, top_k] renormalized routing weights; w1, w3: [experts, d_model, d_ff];
w2: [experts, d_ff, d_model]. Output: sum_k weight[t, k] * expert_{idx[t, k]}(x[t]).
recompute_gated: the experts' gated product recomputed in the backward pass instead of
saved (layers.gated_down); the MoE block passes False where its layer is rematerialized.

Every strategy is exact and dropless (no token is ever dropped):
- "dense":  every expert on every token, then mask; E/top_k times the FLOPs. The
            reference the others are tested against.
- "ragged": sort the token copies by expert, run each group through its expert with
            jax.lax.ragged_dot (a native grouped matmul on TPU), unsort, weight, sum.
- "sorted": sort by expert, pad each group to whole blocks, one batched matmul over the
            blocks with each block's expert weights (gathered per block).
- "grouped": sort by expert, then moe/model/gmm.py's grouped matmul: a loop over experts
            and their row blocks that reads each expert's weights in place, with its own
            backward pass; the fastest on CPU and GPU.
- "megablox": ragged's sort, with jax's Pallas megablox grouped matmul kernels
            (moe/model/megablox.py): the TPU kernel MaxText uses; interpreted (slowly)
            elsewhere, for tests.
- "gather": each copy's expert weights gathered and applied to its one row; for a few
            tokens (decoding), where sorting and looping over every expert cost more than
            reading the chosen experts' weights. "auto" picks it when copies <= experts.

Any expert weight may be a LoRA-adapted one (moe/model/lora.py): each strategy multiplies
through `matmul` with its own product, so an expert's adapter pair meets exactly the rows
routed to that expert, by the same grouped product as its base weight.

Any expert weight may be quantized (a QArray, moe/quant): "grouped" dequantizes one expert
at a time inside its loop, "gather" only the experts a copy was routed to; "dense",
"ragged" and "sorted" use every expert at once and dequantize the layer's weights first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe.model import megablox
from moe.model.experts import ExpertList, switch_experts
from moe.model.gmm import gmm
from moe.model.layers import gated_down
from moe.model.lora import Adapted, matmul
from moe.model.qarray import as_array


def _swiglu(mm, x, w1, w3, w2, mm_rest=None, recompute_gated: bool = True):
    """w2(silu(x w1) * (x w3)) with `mm` for the products on x and `mm_rest` (default mm)
    for those on per-expert rows (the adapters' second factor and w2); the gated product
    recomputed in the backward pass unless `recompute_gated` is False (layers.gated_down).
    Serving several adapters (Adapted.select_cols > 0), x's last columns are each row's
    adapter selector: split off here, in whatever order the dispatch has put the rows."""
    n_select = max((w.select_cols for w in (w1, w3, w2) if isinstance(w, Adapted)), default=0)
    if n_select:
        x, select = x[..., :-n_select], x[..., -n_select:]
        w1, w3, w2 = (w.replace(select=select) if isinstance(w, Adapted) else w for w in (w1, w3, w2))
    mm_rest = mm_rest or mm
    down = lambda h, w: matmul(mm_rest, h, w)
    return gated_down(down, matmul(mm, x, w1, mm_rest), matmul(mm, x, w3, mm_rest), w2, recompute_gated)


def _whole(w):
    """An expert weight as arrays (a quantized base dequantized for the whole layer)."""
    return w.replace(w=as_array(w.w)) if isinstance(w, Adapted) else as_array(w)


def dense_dispatch(x_td, expert_idx_tk, weight_tk, w1_edf, w3_edf, w2_efd, *, recompute_gated: bool = True):
    w1_edf, w3_edf, w2_efd = _whole(w1_edf), _whole(w3_edf), _whole(w2_efd)
    n_experts = w1_edf.shape[0]
    y_etd = _swiglu(
        lambda x, w: jnp.einsum("td,edf->etf", x, w),
        x_td,
        w1_edf,
        w3_edf,
        w2_efd,
        lambda x, w: jnp.einsum("etf,efd->etd", x, w),
        recompute_gated,
    )
    combine_te = jnp.einsum("tke,tk->te", jax.nn.one_hot(expert_idx_tk, n_experts, dtype=weight_tk.dtype), weight_tk)
    return jnp.einsum("te,etd->td", combine_te.astype(y_etd.dtype), y_etd)


def sort_by_expert(expert_idx_tk, weight_tk, n_experts: int):
    """Order of the token copies [tokens * top_k] grouped by expert, and each group's size.

    Copies with weight 0 (the empty slots of expert-parallel buffers) sort last and belong
    to no group, so the grouped matmul skips them.
    """
    flat_e = jnp.where(weight_tk.reshape(-1) != 0, expert_idx_tk.reshape(-1), n_experts)  # [tokens * top_k]
    order = jnp.argsort(flat_e, stable=True)
    group_sizes = jnp.bincount(flat_e, length=n_experts).astype(jnp.int32)  # [experts], skipped excluded
    return order, group_sizes


def ragged_dispatch(
    x_td,
    expert_idx_tk,
    weight_tk,
    w1_edf,
    w3_edf,
    w2_efd,
    grouped_matmul=jax.lax.ragged_dot,
    *,
    recompute_gated: bool = True,
):
    tokens, top_k = expert_idx_tk.shape
    w1_edf, w3_edf, w2_efd = _whole(w1_edf), _whole(w3_edf), _whole(w2_efd)
    order, group_sizes = sort_by_expert(expert_idx_tk, weight_tk, w1_edf.shape[0])
    x_sorted = x_td[order // top_k]  # [tokens * top_k, d_model], grouped by expert
    mm = lambda x, w: grouped_matmul(x, w, group_sizes)
    y_sorted = _swiglu(mm, x_sorted, w1_edf, w3_edf, w2_efd, recompute_gated=recompute_gated)  # [copies, d_model]
    y_flat = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
    y_tkd = y_flat.reshape(tokens, top_k, -1)
    return jnp.einsum("tkd,tk->td", y_tkd, weight_tk.astype(y_tkd.dtype))


def block_size(copies: int, n_experts: int) -> int:
    """Rows per block: a power of two near copies / (4 * experts), between 8 and 256, so
    padding (under one block per expert) stays small against the copies."""
    target = max(8, copies // (4 * n_experts))
    return int(min(256, 2 ** (target.bit_length() - 1)))


def sorted_dispatch(x_td, expert_idx_tk, weight_tk, w1_edf, w3_edf, w2_efd, *, recompute_gated: bool = True):
    """Sort copies by expert, pad each expert's group to whole blocks of rows, and run every
    block through its own expert as one batched matmul. Work: the routed copies plus under
    one block of padding per expert (not E times the copies, as a masked product does)."""
    tokens, top_k = expert_idx_tk.shape
    w1_edf, w3_edf, w2_efd = _whole(w1_edf), _whole(w3_edf), _whole(w2_efd)
    n_experts, d_model = w1_edf.shape[0], x_td.shape[1]
    copies = tokens * top_k
    rows = block_size(copies, n_experts)
    n_blocks = -(-copies // rows) + n_experts  # static bound on sum_e ceil(size_e / rows)
    order, group_sizes = sort_by_expert(expert_idx_tk, weight_tk, n_experts)
    padded = -(-group_sizes // rows) * rows  # [experts]
    padded_end = jnp.cumsum(padded)
    group_start, padded_start = jnp.cumsum(group_sizes) - group_sizes, padded_end - padded
    sorted_e = jnp.where(weight_tk.reshape(-1) != 0, expert_idx_tk.reshape(-1), n_experts)[order]
    e = jnp.minimum(sorted_e, n_experts - 1)
    dest = jnp.where(sorted_e < n_experts, padded_start[e] + jnp.arange(copies) - group_start[e], n_blocks * rows)
    x_rows = jnp.zeros((n_blocks * rows + 1, d_model), x_td.dtype).at[dest].set(x_td[order // top_k])
    x_blocks = x_rows[:-1].reshape(n_blocks, rows, d_model)  # [blocks, rows, d_model]
    block_expert = jnp.minimum(
        jnp.searchsorted(padded_end, jnp.arange(n_blocks) * rows, side="right"), n_experts - 1
    )  # [blocks]; unused blocks hold zeros
    mm = lambda x, w: jnp.einsum("nrd,ndf->nrf", x, w[block_expert])
    y_rows = _swiglu(mm, x_blocks, w1_edf, w3_edf, w2_efd, recompute_gated=recompute_gated)
    d_out = y_rows.shape[-1]  # d_model (x may carry adapter selector columns too)
    y_rows = y_rows.reshape(n_blocks * rows, d_out)
    y_sorted = jnp.concatenate([y_rows, jnp.zeros((1, d_out), y_rows.dtype)])[dest]  # [copies, d_model]
    y_flat = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
    return jnp.einsum("tkd,tk->td", y_flat.reshape(tokens, top_k, d_out), weight_tk.astype(y_flat.dtype))


def grouped_dispatch(x_td, expert_idx_tk, weight_tk, w1_edf, w3_edf, w2_efd, *, recompute_gated: bool = True):
    """Like ragged, with the grouped matmul of moe/model/gmm.py in place of ragged_dot."""
    tokens, top_k = expert_idx_tk.shape
    rows = block_size(tokens * top_k, w1_edf.shape[0])
    order, group_sizes = sort_by_expert(expert_idx_tk, weight_tk, w1_edf.shape[0])
    x_sorted = x_td[order // top_k]  # [tokens * top_k, d_model], grouped by expert
    mm = lambda x, w: gmm(x, w, group_sizes, rows)
    y_sorted = _swiglu(mm, x_sorted, w1_edf, w3_edf, w2_efd, recompute_gated=recompute_gated)  # skipped copies zero
    y_flat = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
    return jnp.einsum("tkd,tk->td", y_flat.reshape(tokens, top_k, -1), weight_tk.astype(y_flat.dtype))


def gather_dispatch(x_td, expert_idx_tk, weight_tk, w1_edf, w3_edf, w2_efd, *, recompute_gated: bool = True):
    """Every copy through its own expert's gathered weights: reads tokens * top_k experts
    (at most every expert once when copies <= experts), no sort, no loop over experts.
    One choice k at a time, so each product is a row times its expert's matrix as stored
    ([tokens, in] x [tokens, in, out]); gathering all k at once made XLA copy the gathered
    w1/w3 into a transposed [in, k * out] layout first (6x slower at one token). Experts
    held as separate buffers (ExpertList, decoding on CPU) are picked by lax.switch instead
    of gathered, one copy at a time."""
    if isinstance(w1_edf, ExpertList):
        return _switch_dispatch(x_td, expert_idx_tk, weight_tk, w1_edf, w3_edf, w2_efd)  # decoding: no backward
    y_kt = []
    for k in range(expert_idx_tk.shape[1]):
        rowwise = lambda x, w, e=expert_idx_tk[:, k]: jnp.einsum("ti,tio->to", x, as_array(w[e]))
        y_kt.append(_swiglu(rowwise, x_td, w1_edf, w3_edf, w2_efd, recompute_gated=recompute_gated))  # [tokens, d]
    y_tkd = jnp.stack(y_kt, axis=1)
    return jnp.einsum("tkd,tk->td", y_tkd, weight_tk.astype(y_tkd.dtype))


def _switch_dispatch(x_td, expert_idx_tk, weight_tk, w1: ExpertList, w3: ExpertList, w2: ExpertList):
    """gather_dispatch over separate expert buffers: each copy (token t, choice k) runs the
    branch of its expert, which multiplies the token's row by that expert's own buffers."""
    tokens, top_k = expert_idx_tk.shape
    expert = lambda x, a, b, c: _swiglu(jnp.matmul, x, a, b, c)
    y_td = []
    for t in range(tokens):
        x_1d = x_td[t : t + 1]  # [1, d_model]
        y_k = [switch_experts(expert, expert_idx_tk[t, k], x_1d, w1, w3, w2)[0] for k in range(top_k)]
        y_td.append(jnp.einsum("kd,k->d", jnp.stack(y_k), weight_tk[t].astype(x_td.dtype)))
    return jnp.stack(y_td)


def megablox_dispatch(x_td, expert_idx_tk, weight_tk, w1_edf, w3_edf, w2_efd, *, recompute_gated: bool = True):
    return ragged_dispatch(
        x_td, expert_idx_tk, weight_tk, w1_edf, w3_edf, w2_efd, megablox.grouped_matmul, recompute_gated=recompute_gated
    )


DISPATCH = {
    "dense": dense_dispatch,
    "ragged": ragged_dispatch,
    "sorted": sorted_dispatch,
    "grouped": grouped_dispatch,
    "gather": gather_dispatch,
    "megablox": megablox_dispatch,
}


def resolve(
    name: str,
    copies: int | None = None,
    n_experts: int | None = None,
    quantized: bool = False,
    backend: str | None = None,
    separate: bool = False,
) -> str:
    """The strategy for `name`; "auto" is gather for a few copies (copies <= n_experts:
    decoding), else jax's megablox kernels on TPU (the compiled 8x7B v5p-128 plans: half
    the roofline step time of ragged_dot for 0.62 GiB more temporaries per chip:
    docs/parallelism.md)
    and our grouped matmul elsewhere (ragged_dot lowers to a dense masked product on
    CPU/GPU). Quantized experts take the grouped matmul everywhere: it dequantizes one
    expert at a time (in the 8x7B QLoRA plan on one v5p chip, about a third of ragged's
    temporaries). Experts in separate buffers (`separate`: ExpertList) take
    gather, whatever `name` says."""
    if separate:
        if copies is not None and n_experts is not None and copies > n_experts:
            raise ValueError(
                f"experts held as separate buffers serve at most {n_experts} token copies per "
                f"call (decoding), got {copies}; pass the stacked parameters"
            )
        return "gather"
    if name == "auto":
        if copies is not None and n_experts is not None and copies <= n_experts:
            return "gather"
        return "megablox" if (backend or jax.default_backend()) == "tpu" and not quantized else "grouped"
    if name not in DISPATCH:
        raise ValueError(f"unknown MoE dispatch '{name}'; choose from {sorted(DISPATCH)} or 'auto'")
    return name
