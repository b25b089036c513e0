"""`moe upcycle DENSE_SOURCE MOE_CONFIG OUT`: sparse upcycling (Komatsuzaki et al. 2022).

A dense checkpoint becomes the MoE of MOE_CONFIG, which must be the same architecture but
for n_experts / top_k (and how it computes): attention, norms, embedding and LM head are
copied; the dense MLP's w1, w3, w2 are copied into every expert (optionally plus Gaussian
noise, its own draw per layer, expert and weight, to break their symmetry); the router is
zeros (every expert equally likely: top-k ties go to the first experts) or normal with the
config's init_std. Without noise the MoE computes exactly the dense model: every expert is
the same MLP and the renormalized top-k weights sum to 1.

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
FREE_FIELDS = config_lib.COMPUTE_FIELDS | {"n_experts", "top_k"}
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
    cfg = dataclasses.replace(target, train=dataclasses.replace(target.train, init_from=None))
    dtype = NP_DTYPES[m.param_dtype]
    with written_atomically(out_dir, src) as tmp:
        writer = ParamWriter(tmp / "params", param_shapes(m))

        def write(path, index, array):
            if tuple(path[:2]) != MLP:
                return writer.write(path, index, np.asarray(array).astype(dtype))
            name, layer = path[2], index[0]
            for e in range(m.n_experts):
                w = np.asarray(array, np.float32)
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
        writer.close()
        (tmp / "config.yaml").write_text(config_lib.dump(cfg))
    return cfg
