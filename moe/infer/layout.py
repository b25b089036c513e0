"""The decode loop's parameter layout on CPU: the same weights, in separate buffers.

XLA:CPU copies every slice that feeds a matmul. Decoding from the stacked tree, each token
copied every layer's weights out of the [layers, ...] stack, and at batch 1 the copies of
the chosen experts out of [layers, experts, d_model, d_ff] took longer than the products
(bench-moe profile). This layout hands the decode loop
  layer_0 ... layer_{n-1}   each layer's tree without the leading axis (Transformer(layer_list=True))
  moe/{w1,w3,w2}            an ExpertList of per-expert buffers, when a decode step routes at
                            most n_experts token copies (the gather dispatch; moe/model/experts.py)
made of views of the stacked arrays' memory (numpy views of CPU buffers, put back without a
copy when aligned), so it costs no memory. Prefill takes the per-layer views too (batch
None: experts kept stacked per layer, for the grouped matmul): the scan over the stacked
tree made XLA copy every layer's weights out of it, 205 vs 137 ms for bench-moe's 64-token
prompt (benchmarks/prefill_parts.py). Off CPU, and for quantized or LoRA-adapted layers, there is no layout (None): the
decode loop uses the stacked tree as training does.
"""

from __future__ import annotations

import jax
import numpy as np

from moe.config import ModelConfig
from moe.model.experts import ExpertList
from moe.model.lora import MLP_TARGETS
from moe.model.qarray import QArray


def _plain(layers) -> bool:
    """Every layer weight a float array on one CPU device (no QArray, no adapters)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(layers, is_leaf=lambda x: isinstance(x, QArray))
    for path, leaf in leaves:
        if isinstance(leaf, QArray) or any("_lora_" in str(getattr(k, "key", "")) for k in path):
            return False
        if not isinstance(leaf, (np.ndarray, jax.Array)) or not np.issubdtype(leaf.dtype, np.floating):
            return False
        if isinstance(leaf, jax.Array) and (
            len(leaf.sharding.device_set) != 1 or next(iter(leaf.sharding.device_set)).platform != "cpu"
        ):
            return False
    return True


def decode_layout(cfg: ModelConfig, params, batch: int | None):
    """params for Transformer(cfg, layer_list=True) decoding `batch` rows (None: prefilling,
    experts never split), or None (use params)."""
    layers = params.get("layers")
    if jax.default_backend() != "cpu" or layers is None or not _plain(layers):
        return None
    host = jax.tree_util.tree_map(np.asarray, layers)  # views of the CPU buffers: no copy
    split = cfg.is_moe and batch is not None and batch * cfg.top_k <= cfg.n_experts
    views = {}
    for i in range(cfg.n_layers):
        layer = jax.tree_util.tree_map(lambda a, i=i: a[i], host)
        if split:
            experts = {
                name: ExpertList(tuple(host["moe"][name][i, e] for e in range(cfg.n_experts))) for name in MLP_TARGETS
            }
            layer = {**layer, "moe": {**layer["moe"], **experts}}
        views[f"layer_{i}"] = layer
    views = jax.device_put(views)  # one call for every view (each put back without a copy when aligned)
    return {**{name: value for name, value in params.items() if name != "layers"}, **views}
