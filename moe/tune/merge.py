"""Folding adapters into their weights: W + scale * A B, computed in float32, cast back."""

from __future__ import annotations

import numpy as np
from flax import traverse_util

from moe.config import LoRAConfig
from moe.model.lora import is_adapter, scale as lora_scale


def merged_weight(w, a, b, scale: float) -> np.ndarray:
    """W [*lead, *ins, *outs] + scale * A [*lead, *ins, r] B [*lead, r, *outs]."""
    w, a, b = (np.asarray(x, np.float32) for x in (w, a, b))
    n_lead = (a.ndim - 1) + (b.ndim - 1) - w.ndim
    lead = w.shape[:n_lead]
    a2 = a.reshape(*lead, -1, a.shape[-1])  # [*lead, in, r]
    b2 = b.reshape(*lead, b.shape[n_lead], -1)  # [*lead, r, out]
    return w + scale * np.matmul(a2, b2).reshape(w.shape)


def merge(params, lora: LoRAConfig) -> dict:
    """Plain params (no adapter left) equal in function to `params` with `lora`'s adapters."""
    flat = traverse_util.flatten_dict(params)
    scale = lora_scale(lora.alpha, lora.rank, lora.rslora)
    out = {}
    for path, value in flat.items():
        if is_adapter(path):
            continue
        a_path = (*path[:-1], f"{path[-1]}_lora_a")
        if a_path in flat:
            b = flat[(*path[:-1], f"{path[-1]}_lora_b")]
            value = merged_weight(value, flat[a_path], b, scale).astype(np.asarray(value).dtype)
        out[path] = value
    return traverse_util.unflatten_dict(out)
