"""`moe experts prune|merge SOURCE OUT --data PATHS`: an MoE with fewer experts per layer,
chosen by how the source routes the given texts.

Routing is measured with `moe analyze`'s code (moe/study/routing.py: the same documents
read the same way, the model's own router): per layer, each expert's load (its top-k
copies), its routing weight (the sum of its top-k weights) and the router logits of every
token.

  prune   keep the K experts with the most routing weight (`--by weight`, default) or load
          (`--by load`); drop the rest with their router rows. Kept experts and router rows
          are the source's, bit for bit, in their original order.
  merge   MC-SMoE's grouping and merging, without its low-rank step: the K most used
          experts lead a group each; every other expert joins the leader whose router
          logits over the tokens are most similar (cosine); a group's weights are its
          experts' usage-weighted average (a leader alone is kept as it is) and its router
          row is the leader's.

The output is a normal checkpoint (OUT/params, OUT/config.yaml with n_experts = K) that
every command reads and `moe convert to-hf` exports, written under OUT.partial and renamed
when complete; OUT/surgery.json records, per layer, the experts kept (and merged into each).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moe import config as config_lib
from moe.checkpoint.params import save_params
from moe.convert.hf import NP_DTYPES
from moe.convert.stream import open_source, written_atomically
from moe.data import tokenizer as tokenizer_lib
from moe.infer import source as source_lib
from moe.model.moe import route
from moe.model.transformer import Transformer
from moe.study import routing

EXPERT_WEIGHTS = ("w1", "w3", "w2")


class SurgeryError(ValueError):
    """Inputs expert surgery cannot use; the message says what to change."""


def router_logits(cfg, params, tokens):
    """Of int tokens [batch, seq]: every layer's router logits [layers, batch, seq, experts]."""
    _, state = Transformer(cfg).apply({"params": params}, tokens, mutable=["intermediates"])
    return state["intermediates"]["layers"]["moe"]["router_logits"][0]


def usage(cfg, params, docs: list[list[int]], seq: int) -> dict:
    """Per layer [layers, experts]: load (top-k copies) and weight (summed top-k weights), and
    the router logits of every token [layers, tokens, experts], over the documents."""
    fn = jax.jit(lambda p, t: (router_logits(cfg, p, t),))  # [layers, batch, seq, experts]
    logits = [doc[0] for doc in routing.per_document(lambda tokens: fn(params, tokens), docs, seq)]
    logits_lte = np.concatenate(logits, axis=1)
    bias = params["layers"]["moe"].get("bias")
    load, weight = [], []
    for layer, layer_logits in enumerate(logits_lte):
        layer_bias = None if bias is None else jnp.asarray(bias[layer])
        _, w_tk, idx_tk = route(
            jnp.asarray(layer_logits), cfg.top_k, cfg.router_scores, cfg.norm_topk, cfg.routed_scale, layer_bias
        )
        idx_tk, w_tk = np.asarray(idx_tk), np.asarray(w_tk, np.float64)
        load.append(np.bincount(idx_tk.reshape(-1), minlength=cfg.n_experts).astype(np.float64))
        weight.append(np.bincount(idx_tk.reshape(-1), weights=w_tk.reshape(-1), minlength=cfg.n_experts))
    return {"load": np.stack(load), "weight": np.stack(weight), "logits": logits_lte}


def top(scores: np.ndarray, k: int) -> list[int]:
    """The k highest-scoring experts (ties to the lower index), in ascending index order."""
    order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
    return sorted(order[:k])


def groups(load: np.ndarray, logits_te: np.ndarray, k: int) -> dict[int, list[int]]:
    """{leader: its group, leader first}: the k most used experts lead; every other expert
    joins the leader with the most similar router logits over the tokens (cosine)."""
    leaders = top(load, k)
    unit = logits_te / np.maximum(np.linalg.norm(logits_te, axis=0, keepdims=True), 1e-12)  # [tokens, experts]
    out = {leader: [leader] for leader in leaders}
    for e in range(len(load)):
        if e not in out:
            similarity = [float(unit[:, e] @ unit[:, leader]) for leader in leaders]
            out[leaders[int(np.argmax(similarity))]].append(e)
    return out


def _merged(w_e: np.ndarray, members: list[int], load: np.ndarray) -> np.ndarray:
    """One group's weight: its members' usage-weighted average (a lone member as it is)."""
    if len(members) == 1:
        return w_e[members[0]]
    share = load[members] / load[members].sum() if load[members].sum() > 0 else np.full(len(members), 1 / len(members))
    return np.einsum("e,e...->...", share, w_e[members].astype(np.float64)).astype(w_e.dtype)


def new_params(params: dict, plans: list[dict[int, list[int]]], load: np.ndarray) -> dict:
    """The source's params with each layer's experts, router rows (and bias) per plan:
    {kept expert: the experts merged into it (itself first)}, in the kept experts' order."""
    moe = params["layers"]["moe"]
    out = dict(moe)
    for name in EXPERT_WEIGHTS:
        w = np.asarray(moe[name])  # [layers, experts, ...]
        out[name] = np.stack(
            [np.stack([_merged(w[i], plan[e], load[i]) for e in sorted(plan)]) for i, plan in enumerate(plans)]
        )
    out["gate"] = np.stack([np.asarray(moe["gate"])[i][:, sorted(plan)] for i, plan in enumerate(plans)])
    if "bias" in moe:
        out["bias"] = np.stack([np.asarray(moe["bias"])[i][sorted(plan)] for i, plan in enumerate(plans)])
    return {**params, "layers": {**params["layers"], "moe": out}}


def _check(stored: config_lib.Config, k: int, source: str) -> None:
    """Refuse what surgery cannot use, from the source's config alone (before reading weights)."""
    m = stored.model
    if not m.is_moe:
        raise SurgeryError(f"{source} is a dense model: it has no experts to prune or merge")
    if not m.top_k <= k < m.n_experts:
        raise SurgeryError(
            f"the number of experts to keep must be at least model.top_k ({m.top_k}) and fewer than "
            f"the source's {m.n_experts}; got {k}"
        )
    if stored.quant.base is not None:
        raise SurgeryError(f"{source} holds quantized weights; prune or merge its full-precision source, then quantize")


def _documents(src, data: str, docs: int, seq: int) -> list[list[int]]:
    try:
        files = routing.domains([f"data={data}"])["data"]
    except routing.AnalyzeError:
        raise SurgeryError(f"--data {data}: no files there; give files, folders or globs that exist") from None
    texts = routing.encode(tokenizer_lib.load(src.tokenizer), files, docs, seq)
    if not texts:
        raise SurgeryError(f"--data {data}: the files hold no text; give other files")
    return texts


def run(
    method: str, source: str, out: str, k: int, data: str, by: str = "weight", docs: int = 32, seq: int = 256
) -> dict:
    """Prune or merge SOURCE to k experts per layer into OUT; returns the record written to surgery.json."""
    if method not in ("prune", "merge") or by not in ("weight", "load"):
        raise SurgeryError(f"unknown surgery {method!r} by {by!r}: prune (by weight or load) or merge")
    out_dir = Path(out)
    if out_dir.exists():
        raise SurgeryError(f"{out_dir} exists; choose a new output folder")
    try:
        stored, _ = open_source(Path(source))  # the source's config and dtypes, before the float32 read
    except (ValueError, OSError) as e:
        raise SurgeryError(str(e)) from None
    _check(stored, k, source)
    src = source_lib.load(source, "float32")
    m = src.model
    seq = min(seq, m.max_seq_len)
    stats = usage(m, src.params, _documents(src, data, docs, seq), seq)
    if method == "prune":
        plans = [{e: [e] for e in top(scores, k)} for scores in stats[by]]
    else:
        plans = [groups(load, logits, k) for load, logits in zip(stats["load"], stats["logits"])]
    model = dataclasses.replace(m, n_experts=k, dtype=stored.model.dtype, param_dtype=stored.model.param_dtype)
    params = new_params(src.params, plans, stats["load"])
    params = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(NP_DTYPES[model.param_dtype]), params)
    cfg = dataclasses.replace(src.config, model=model, train=dataclasses.replace(src.config.train, init_from=None))
    record = {
        "source": str(source),
        "method": method,
        "by": by if method == "prune" else "load",
        "experts": k,
        "layers": [
            {
                "kept": sorted(plan),
                "merged": {str(e): plan[e] for e in sorted(plan)},
                "share_kept": float(stats["weight"][i][sorted(plan)].sum() / max(stats["weight"][i].sum(), 1e-12)),
            }
            for i, plan in enumerate(plans)
        ],
    }
    with written_atomically(out_dir, Path(source)) as tmp:
        save_params(tmp / "params", params)
        (tmp / "config.yaml").write_text(config_lib.dump(cfg))
        (tmp / "surgery.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def summary(record: dict) -> str:
    lines = [f"{record['method']} to {record['experts']} experts per layer (by {record['by']}):"]
    for i, layer in enumerate(record["layers"]):
        lines.append(f"  layer {i}: kept {layer['kept']}, {100 * layer['share_kept']:.1f}% of the routing weight")
    return "\n".join(lines)
