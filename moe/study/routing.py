"""`moe analyze SOURCE --data NAME=PATHS ...`: where a trained MoE routes its tokens (the
Mixtral paper's section 5).

For each named domain (a set of texts) and layer:
  load          the fraction of token copies (top_k per token) each expert received; sums to 1
  repeat rates  of consecutive token pairs within a document: the same first-choice expert,
                and top-k sets that share an expert; beside the rates independent routing
                with the observed frequencies would give (the paper's Table 5)
and a rendering of sample texts with each token colored by its first-choice expert.
Writes analysis.json, analysis.md, load_layer<L>.png, tokens.html and tokens_layer<L>.png.
"""

from __future__ import annotations

import collections
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moe import progress
from moe.data import corpus
from moe.data import pipeline as data
from moe.data import tokenizer as tokenizer_lib
from moe.infer import source as source_lib
from moe.model.transformer import Transformer
from moe.study.routing_plots import heatmaps, render_tokens


class AnalyzeError(ValueError):
    """Inputs the analysis cannot use; the message says what to change."""


def routing(cfg, params, tokens):
    """Of int tokens [batch, seq]: the top-k expert indices [layers, batch, seq, top_k] and the
    router's probability of the first choice [layers, batch, seq] (1 / n_experts if uniform)."""
    _, state = Transformer(cfg).apply({"params": params}, tokens, mutable=["intermediates"])
    sown = state["intermediates"]["layers"]["moe"]
    return sown["expert_idx"][0], sown["top1_prob"][0]


def load_fractions(choices: np.ndarray, n_experts: int) -> np.ndarray:
    """choices [tokens, top_k] -> the fraction of copies per expert [n_experts] (sums to 1)."""
    counts = np.bincount(choices.reshape(-1), minlength=n_experts).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def repeat_rates(documents: list[np.ndarray]) -> dict:
    """documents: per document, choices [tokens, top_k] in order (first choice first).

    first_same: pairs of consecutive tokens with the same first choice / pairs;
    topk_share: pairs whose top-k sets intersect / pairs; expected_*: the same rates for
    tokens routed independently, each drawing its first choice (its top-k set) from the
    frequencies observed over all tokens."""
    pairs = same = share = 0
    firsts, sets = collections.Counter(), collections.Counter()
    for choices in documents:
        firsts.update(choices[:, 0].tolist())
        sets.update(frozenset(row) for row in choices.tolist())
        if len(choices) < 2:
            continue
        a, b = choices[:-1], choices[1:]
        pairs += len(a)
        same += int(np.sum(a[:, 0] == b[:, 0]))
        share += int(np.sum((a[:, :, None] == b[:, None, :]).any(axis=(1, 2))))
    n = sum(firsts.values())
    p_first = np.array([c / n for c in firsts.values()]) if n else np.zeros(0)
    q = {s: c / n for s, c in sets.items()} if n else {}
    expected_share = sum(qa * qb for (a, qa), (b, qb) in itertools.product(q.items(), q.items()) if a & b)
    return {
        "pairs": pairs,
        "first_same": same / pairs if pairs else float("nan"),
        "topk_share": share / pairs if pairs else float("nan"),
        "expected_first_same": float(np.sum(p_first**2)),
        "expected_topk_share": float(expected_share),
    }


def domains(specs: list[str]) -> dict[str, list[Path]]:
    root = corpus.stdlib_root()
    out = {}
    for spec in specs:
        if "=" not in spec:
            raise AnalyzeError(f"--data takes NAME=PATHS (comma-separated files, folders or globs), got {spec!r}")
        name, paths = spec.split("=", 1)
        patterns = [p if Path(p).is_absolute() or Path(p).exists() else str(root / p) for p in paths.split(",")]
        try:
            files = data.resolve_paths(tuple(patterns))
        except data.DataError:
            files = []
        if not files:
            raise AnalyzeError(f"domain {name!r} ({paths}) has no files; give files, folders or globs that exist")
        out[name] = files
    return out


def encode(sp, files: list[Path], docs: int, seq: int) -> list[list[int]]:
    """Up to `docs` documents (a file each, evenly spread over the domain), at most seq tokens."""
    step = max(1, len(files) // docs)
    out = []
    for path in files[::step][:docs]:
        ids = [sp.bos_id(), *sp.encode(path.read_text(errors="replace"))][:seq]
        if len(ids) > 1:
            out.append(ids)
    return out


def per_document(fn, docs: list[list[int]], seq: int, batch: int = 8, desc: str | None = None) -> list[tuple]:
    """fn(tokens [batch, seq]) -> arrays [layers, batch, seq, ...], run over the documents
    in zero-padded batches of `batch` rows: per document, each array cut to its tokens."""
    out = []
    starts = range(0, len(docs), batch)
    for first in progress.bar(starts, desc=desc, unit="batch") if desc else starts:
        group = docs[first : first + batch]
        tokens = np.zeros((batch, seq), np.int32)
        for r, ids in enumerate(group):
            tokens[r, : len(ids)] = ids
        arrays = [np.asarray(a) for a in fn(jnp.asarray(tokens))]
        out += [tuple(a[:, r, : len(ids)] for a in arrays) for r, ids in enumerate(group)]
    return out


def _route_docs(src, docs: list[list[int]], seq: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per document, its choices [layers, tokens, top_k] and first-choice probabilities [layers, tokens]."""
    fn = jax.jit(lambda p, t: routing(src.model, p, t))
    return per_document(lambda tokens: fn(src.params, tokens), docs, seq, desc="routing documents")


def analyze(
    source: str, specs: list[str], out: str, layers=None, docs: int = 16, seq: int = 256, dtype: str = "float32"
) -> dict:
    if not specs:
        raise AnalyzeError("give at least one NAME=PATHS domain")
    found = domains(specs)  # every domain checked before anything runs
    src = source_lib.load(source, dtype)
    m = src.model
    if not m.is_moe:
        raise AnalyzeError(f"{source} is a dense model: there is no routing to analyze")
    layers = list(range(m.n_layers)) if not layers else list(layers)
    if any(not 0 <= layer < m.n_layers for layer in layers):
        raise AnalyzeError(f"--layers must be in 0..{m.n_layers - 1}, got {layers}")
    sp = tokenizer_lib.load(src.tokenizer)
    seq = min(seq, m.max_seq_len)
    encoded = {name: encode(sp, files, docs, seq) for name, files in found.items()}
    for name, texts in encoded.items():
        if not texts:
            raise AnalyzeError(f"domain {name!r} has no text (its files are empty); give other files")
    routed = {name: _route_docs(src, texts, seq) for name, texts in encoded.items()}
    result = {"source": str(source), "n_experts": m.n_experts, "top_k": m.top_k, "layers": {}}
    for layer in layers:
        per = {}
        for name, docs_routed in routed.items():
            choices = [c[layer] for c, _ in docs_routed]
            top1 = np.concatenate([p[layer] for _, p in docs_routed])
            per[name] = {
                "load": load_fractions(np.concatenate(choices), m.n_experts).tolist(),
                "tokens": int(top1.size),
                "mean_top1_prob": float(top1.mean()),
                **repeat_rates(choices),
            }
        result["layers"][str(layer)] = per
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "analysis.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "analysis.md").write_text(summary(result) + "\n")
    heatmaps(result, out_dir)
    samples = {name: (encoded[name][0][:96], routed[name][0][0][:, :96]) for name in routed}
    render_tokens(samples, sp, layers, m.n_experts, out_dir)
    return result


def summary(result: dict) -> str:
    k, e = result["top_k"], result["n_experts"]
    lines = [
        f"# Routing analysis of {result['source']}",
        "",
        f"{e} experts, top-{k}: a uniform load is {1 / e:.3f} of the copies per expert, and a router "
        f"with no preference gives its first choice probability {1 / e:.3f}.",
        "",
        "| layer | domain | tokens | max / min expert load | mean first-choice probability | "
        "first choice repeats (independent) | top-k sets share an expert (independent) |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer, per in result["layers"].items():
        for name, r in per.items():
            load = r["load"]
            lines.append(
                f"| {layer} | {name} | {r['tokens']} | {max(load):.3f} / {min(load):.3f} | "
                f"{r['mean_top1_prob']:.3f} | "
                f"{r['first_same']:.3f} ({r['expected_first_same']:.3f}) | "
                f"{r['topk_share']:.3f} ({r['expected_topk_share']:.3f}) |"
            )
    return "\n".join(lines)
