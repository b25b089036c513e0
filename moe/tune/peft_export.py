"""`moe lora export`: a LoRA run's adapters as a PEFT adapter folder for the base model's
Hugging Face export (`moe convert to-hf`), loaded with `PeftModel.from_pretrained`.

Layout (tested against peft 0.21 on transformers 5, whose Mixtral keeps its experts as
fused 3-D parameters and its router as a bare parameter):
    attention, dense MLP   target_modules q_proj, k_proj, v_proj, o_proj, gate_proj,
                           up_proj, down_proj (nn.Linear): lora_A [r, in], lora_B [out, r]
    experts                target_parameters mlp.experts.gate_up_proj and down_proj:
                           lora_A [r * E, in] (expert-major rows), lora_B [out, r * E]
                           (expert-minor columns), PEFT's ParamWrapper layout. Our w1 and
                           w3 adapters are independent, so gate_up_proj gets rank 2r: A
                           stacks both, B is block-diagonal (rank_pattern says so)
    router                 target_parameters mlp.gate.weight (2-D)
Our scale (alpha / r, or alpha / sqrt(r)) is folded into B and every exported alpha equals
its rank, so PEFT's scaling is 1 whatever it would compute. Older stacks (transformers 4,
peft < 0.17) name experts block_sparse_moe.experts.E.w1 as separate nn.Linear modules and
cannot read this folder's expert entries; export from a run without expert targets there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from moe.config import Config
from moe.model.lora import expand_targets
from moe.model.lora import scale as lora_scale

PREFIX = "base_model.model.model.layers.{layer}."
ATTENTION = {
    "q": ("self_attn.q_proj", 1),
    "k": ("self_attn.k_proj", 1),
    "v": ("self_attn.v_proj", 1),
    "o": ("self_attn.o_proj", 2),
}
DENSE_MLP = {"w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj"}


class ExportError(ValueError):
    """The run cannot be exported as a PEFT adapter; the message says what to do instead."""


def _linear(a, b, n_in: int, scale: float):
    """lora_A [r, in], lora_B [out, r] (scale folded in) for one layer's adapter pair."""
    r = a.shape[-1]
    return a.reshape(-1, r).T, scale * b.reshape(r, -1).T


def _experts(pairs: list, width: int, scale: float):
    """PEFT's ParamWrapper factors for an [E, out, in] parameter made of output blocks of
    `width` rows (gate and up, or down alone), each from our per-expert pair (A [E, in, r],
    B [E, r, width]) or None (no adapter: zero rows)."""
    present = [p for p in pairs if p is not None]
    e, r = present[0][0].shape[0], sum(a.shape[-1] for a, _ in present)
    a_stack = np.concatenate([np.swapaxes(a, 1, 2) for a, _ in present], axis=1)  # [E, R, in]
    b_full = np.zeros((width * len(pairs), r, e), np.float32)  # [out, R, E], block-diagonal in (out, R)
    col = 0
    for block, pair in enumerate(pairs):
        if pair is not None:
            a, b = pair
            b_full[block * width : (block + 1) * width, col : col + a.shape[-1]] = scale * np.transpose(b, (2, 1, 0))
            col += a.shape[-1]
    return a_stack.reshape(e * r, -1), b_full.reshape(-1, r * e), r


def export(cfg: Config, adapters: dict, out_dir: str | Path, base_model: str = "") -> Path:
    """Write adapter_config.json and adapter_model.safetensors for cfg.lora's adapters."""
    lora, model = cfg.lora, cfg.model
    if lora.train_router:
        raise ExportError(
            "this run trained the whole router, which a LoRA adapter cannot carry; export the "
            "merged model instead: `moe lora merge RUN OUT` then `moe convert to-hf OUT HF_DIR`"
        )
    flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(adapters).items()}
    pair = lambda block, name: (flat[("layers", block, f"{name}_lora_a")], flat[("layers", block, f"{name}_lora_b")])
    s = lora_scale(lora.alpha, lora.rank, lora.rslora)
    targets = expand_targets(lora.targets)
    tensors, modules, parameters, ranks = {}, [], [], {}
    for name in sorted(targets & set(ATTENTION) | (targets & set(DENSE_MLP) if not model.is_moe else set())):
        module, n_in = ATTENTION[name] if name in ATTENTION else (DENSE_MLP[name], 1)
        modules.append(module.split(".")[-1])
        a, b = pair("attn" if name in ATTENTION else "mlp", name)
        for layer in range(model.n_layers):
            lora_a, lora_b = _linear(a[layer], b[layer], n_in, s)
            tensors[PREFIX.format(layer=layer) + module + ".lora_A.weight"] = lora_a
            tensors[PREFIX.format(layer=layer) + module + ".lora_B.weight"] = lora_b
    if model.is_moe:
        groups = [
            (param, names, width)
            for param, names, width in [
                ("gate_up_proj", ("w1", "w3"), model.d_ff),
                ("down_proj", ("w2",), model.d_model),
            ]
            if targets & set(names)
        ]
        for i, (param, names, width) in enumerate(groups):
            parameters.append(f"mlp.experts.{param}")
            inner = ".base_layer" * (len(groups) - 1 - i)  # PEFT nests one wrapper per targeted parameter
            for layer in range(model.n_layers):
                layer_pairs = [tuple(x[layer] for x in pair("moe", n)) if n in targets else None for n in names]
                a_w, b_w, rank = _experts(layer_pairs, width, s)
                key = PREFIX.format(layer=layer) + f"mlp.experts{inner}"
                tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = a_w, b_w
            if rank != lora.rank:
                ranks[param] = rank
        if "gate" in targets:
            parameters.append("mlp.gate.weight")
            a, b = pair("moe", "gate")
            for layer in range(model.n_layers):
                lora_a, lora_b = _linear(a[layer], b[layer], 1, s)
                tensors[PREFIX.format(layer=layer) + "mlp.gate.lora_A.weight"] = lora_a
                tensors[PREFIX.format(layer=layer) + "mlp.gate.lora_B.weight"] = lora_b
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.rank,
        "rank_pattern": ranks,
        "alpha_pattern": dict(ranks),
        "use_rslora": False,
        "lora_dropout": lora.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": modules,
        "target_parameters": parameters or None,
        "inference_mode": True,
    }
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
