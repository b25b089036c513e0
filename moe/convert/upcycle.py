"""`moe upcycle DENSE_SOURCE MOE_CONFIG OUT`: sparse upcycling (Komatsuzaki et al. 2022).

A dense checkpoint becomes the MoE of MOE_CONFIG, which must be the same architecture but
for n_experts / top_k (and how it computes): attention, norms, embedding and LM head are
copied; the dense MLP's w1, w3, w2 are copied into every expert (optionally plus Gaussian
noise, its own draw per layer, expert and weight, to break their symmetry); the router is
zeros (every expert equally likely: top-k ties go to the first experts) or normal with the
config's init_std. Without noise the MoE computes exactly the dense model: every expert is
the same MLP and the renormalized top-k weights sum to 1.

Fine-grained upcycling: when the MoE's d_ff is the dense d_ff / G, each expert takes a
slice of the dense MLP's hidden units (expert e the slice e mod G, so every G consecutive
experts hold the whole MLP), and the MoE needs top_k and n_experts multiples of G,
model.routed_scale = G and the zeros router. Then every token's top-k (ties go to the
first experts) holds each slice top_k / G times with weight G / top_k, whose sum is the
dense MLP: a SwiGLU is the sum of its hidden units' contributions.

Streamed slice by slice (moe/convert/stream.py) into OUT/params + OUT/config.yaml, written
under OUT.partial and renamed when complete.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from moe import config as config_lib
from moe.checkpoint.params import ParamWriter
from moe.config import ModelConfig
from moe.convert.hf import NP_DTYPES
from moe.convert.stream import open_source, written_atomically
from moe.model import param_shapes

ROUTER_INITS = ("zeros", "normal")
# what may differ between the dense source and the MoE: the experts, and how it computes
FREE_FIELDS = config_lib.COMPUTE_FIELDS | {"n_experts", "top_k", "d_ff", "routed_scale", "balance"}
MLP = ("layers", "mlp")


class UpcycleError(ValueError):
    """The source cannot be upcycled into this config; the message says why."""


def check(dense: ModelConfig, moe: ModelConfig, where: str) -> None:
    if dense.is_moe:
        raise UpcycleError(f"{where} is already an MoE ({dense.n_experts} experts); upcycle a dense model")
    if not moe.is_moe:
        raise UpcycleError("the target config is dense (model.n_experts = 0); give an MoE config")
    diffs = config_lib.architecture_diffs(dense, moe, free=FREE_FIELDS)
    if diffs:
        listed = ", ".join(f"model.{n} is {d} in the source but {m} in the MoE config" for n, d, m in diffs)
        raise UpcycleError(
            f"{where} does not match the MoE config: {listed}; the MoE must keep the dense "
            f"shape ({' '.join(f'model.{n}={d}' for n, d, _ in diffs)})"
        )


def granularity(dense: ModelConfig, moe: ModelConfig, router_init: str) -> int:
    """G: how many experts the dense MLP is split into (1: each expert a whole copy)."""
    if dense.d_ff % moe.d_ff:
        raise UpcycleError(
            f"the MoE's model.d_ff ({moe.d_ff}) must divide the dense d_ff ({dense.d_ff}): each expert "
            "takes an equal slice of the dense MLP (or a whole copy, with the same d_ff)"
        )
    g = dense.d_ff // moe.d_ff
    if moe.n_experts % g or moe.top_k % g:
        raise UpcycleError(
            f"splitting the dense MLP into {g} slices needs model.n_experts ({moe.n_experts}) and "
            f"model.top_k ({moe.top_k}) to be multiples of {g}, so every token's top-k holds each slice"
        )
    if moe.routed_scale != g or not moe.norm_topk or moe.n_shared_experts:
        raise UpcycleError(
            f"the MoE computes the dense model only with model.routed_scale={g} (the dense MLP split "
            f"into {g}), model.norm_topk=true and no shared experts; got routed_scale={moe.routed_scale}, "
            f"norm_topk={moe.norm_topk}, n_shared_experts={moe.n_shared_experts}"
        )
    if g > 1 and router_init != "zeros":
        raise UpcycleError(
            "fine-grained upcycling needs --router-init zeros: a random router would not give "
            "every token one expert of each slice"
        )
    return g


def _slice(name: str, w: np.ndarray, part: int, width: int) -> np.ndarray:
    """Slice `part` of the dense MLP's hidden units: w1, w3 [d_model, d_ff] by columns, w2 by rows."""
    cols = slice(part * width, (part + 1) * width)
    return w[cols] if name == "w2" else w[:, cols]


def _noise(seed: int, layer: int, expert: int, name: str, shape, std: float) -> np.ndarray:
    rng = np.random.default_rng([seed, layer, expert, ("w1", "w2", "w3").index(name)])
    return rng.normal(0.0, std, shape).astype(np.float32)


def upcycle(
    source: str, moe_config: str, out: str, overrides=(), router_init: str = "zeros", noise: float = 0.0, seed: int = 0
) -> config_lib.Config:
    if router_init not in ROUTER_INITS:
        raise UpcycleError(f"--router-init must be one of {', '.join(ROUTER_INITS)}, got {router_init!r}")
    if noise < 0:
        raise UpcycleError(f"--noise is a standard deviation, >= 0; got {noise}")
    src, out_dir = Path(source), Path(out)
    target = config_lib.load(moe_config, list(overrides))
    dense_cfg, feed = open_source(src, desc="upcycling")
    if dense_cfg.lora.rank is not None or dense_cfg.quant.base is not None:
        raise UpcycleError(
            f"{source} holds LoRA adapters or quantized weights; upcycle full-precision weights "
            "(`moe lora merge` first)"
        )
    check(dense_cfg.model, target.model, source)
    m = target.model
    g = granularity(dense_cfg.model, m, router_init)
    cfg = dataclasses.replace(target, train=dataclasses.replace(target.train, init_from=None))
    dtype = NP_DTYPES[m.param_dtype]
    with written_atomically(out_dir, src) as tmp:
        writer = ParamWriter(tmp / "params", param_shapes(m))

        def write(path, index, array):
            if tuple(path[:2]) != MLP:
                return writer.write(path, index, np.asarray(array).astype(dtype))
            name, layer = path[2], index[0]
            for e in range(m.n_experts):
                w = _slice(name, np.asarray(array, np.float32), e % g, m.d_ff)
                if noise > 0:
                    w = w + _noise(seed, layer, e, name, w.shape, noise)
                writer.write(("layers", "moe", name), (layer, e), w.astype(dtype))

        feed(write)
        rng = np.random.default_rng([seed, 1 << 20])
        for layer in range(m.n_layers):
            gate = (
                np.zeros((m.d_model, m.n_experts), np.float32)
                if router_init == "zeros"
                else rng.normal(0.0, m.init_std, (m.d_model, m.n_experts)).astype(np.float32)
            )
            writer.write(("layers", "moe", "gate"), (layer,), gate.astype(dtype))
            if m.balance == "bias":
                writer.write(("layers", "moe", "bias"), (layer,), np.zeros(m.n_experts, np.float32))
        writer.close()
        (tmp / "config.yaml").write_text(config_lib.dump(cfg))
    return cfg
