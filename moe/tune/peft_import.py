"""A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) read as this
project's adapter pairs, for serving unmerged beside the base (moe/serve/adapters.py).

It reads what `moe lora export` writes and what peft writes for Hugging Face Mistral and
Mixtral, in both of transformers' layouts:
    attention, dense MLP   self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj (nn.Linear):
                           lora_A [r, in], lora_B [out, r]
    experts, fused         mlp.experts (target_parameters gate_up_proj, down_proj; PEFT's
    (transformers 5)       ParamWrapper): lora_A [r * E, in] expert-major rows, lora_B
                           [out, r * E] expert-minor columns; which of the two parameters a
                           pair adapts follows from its shapes
    experts, per module    block_sparse_moe.experts.E.{w1,w2,w3} (nn.Linear)
    (transformers 4)
    router                 mlp.gate (a 2-D parameter) or block_sparse_moe.gate (nn.Linear)
Each pair becomes (A [*lead, *in, r], B [*lead, r, *out]) in the layout of model/lora.py
with PEFT's scaling (lora_alpha / r, or / sqrt(r) with use_rslora; rank_pattern and
alpha_pattern per module) folded into B, and layers stacked on the leading axis (a layer
the folder leaves out gets zeros).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from moe.config import ModelConfig

ATTENTION = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
DENSE_MLP = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


class PeftError(ValueError):
    """The folder is not a LoRA adapter this model can serve; the message says why."""


def is_peft_folder(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name it ends."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _settings(folder: Path) -> dict:
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise PeftError(f"{folder}: a {config.get('peft_type')} adapter; only LoRA adapters are served")
    if config.get("use_dora"):
        raise PeftError(f"{folder}: a DoRA adapter (use_dora); merge it with peft and serve the merged model")
    if config.get("bias", "none") != "none":
        raise PeftError(f"{folder}: the adapter trains biases (bias={config['bias']!r}), which this model has none of")
    if config.get("modules_to_save"):
        raise PeftError(
            f"{folder}: the adapter saves whole modules ({config['modules_to_save']}); merge it with peft and "
            "serve the merged model"
        )
    return config


def _scale(config: dict, names: list[str], rank: int) -> float:
    """PEFT's scaling of a pair of rank `rank` (its tensors' own, which rank_pattern states)
    on a module known by `names`; lora_alpha, or alpha_pattern's value for it."""
    alpha = config["lora_alpha"]
    for name in names:
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _pairs_by_module(folder: Path) -> dict[tuple[int, str], dict[str, np.ndarray]]:
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise PeftError(f"{folder}: no adapter_model.safetensors (save the adapter with safe_serialization)")
    out: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in load_file(str(path)).items():
        match = KEY.match(key)
        if match is None:
            raise PeftError(f"{folder}: unexpected tensor {key}; expected model.layers.N.<module>.lora_A/B.weight")
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        out.setdefault((layer, module.replace(".base_layer", "")), {}).setdefault(module, {})[which] = np.asarray(
            value, np.float32
        )
    return out


def _fused_experts(model: ModelConfig, config: dict, module: str, a: np.ndarray, b: np.ndarray) -> dict[str, tuple]:
    """Our (A [E, in, R], B [E, R, out]) pairs from a ParamWrapper pair on gate_up_proj
    [E, 2 d_ff, d_model] or down_proj [E, d_model, d_ff]."""
    e = model.n_experts
    if a.shape[1] == model.d_model and b.shape[0] == 2 * model.d_ff:  # gate (w1) rows, then up (w3)
        param = "gate_up_proj"
    elif a.shape[1] == model.d_ff and b.shape[0] == model.d_model:
        param = "down_proj"
    else:
        raise PeftError(f"expert adapter of shapes A {a.shape}, B {b.shape} fits neither gate_up_proj nor down_proj")
    rank = a.shape[0] // e
    s = _scale(config, [module, f"{module}.{param}", param], rank)
    a_eir = np.transpose(a.reshape(e, rank, -1), (0, 2, 1))
    b_ero = s * np.transpose(b.reshape(b.shape[0], rank, e), (2, 1, 0))
    if param == "gate_up_proj":
        return {"w1": (a_eir, b_ero[..., : model.d_ff]), "w3": (a_eir, b_ero[..., model.d_ff :])}
    return {"w2": (a_eir, b_ero)}


def _layer_pairs(model: ModelConfig, config: dict, module: str, tensors: dict) -> dict[tuple, tuple]:
    """{(block, weight): (A, B)} for one layer's module (B scaled)."""
    out = {}
    for full, pair in tensors.items():
        if set(pair) != {"A", "B"}:
            raise PeftError(f"{full}: lora_A or lora_B is missing")
        a, b = pair["A"], pair["B"]
        s = _scale(config, [full], a.shape[0])
        leaf = module.split(".")[-1]
        if leaf in ATTENTION:
            name = ATTENTION[leaf]
            out[("attn", name)] = (a.T, s * b.T)
        elif leaf in DENSE_MLP and not model.is_moe:
            out[("mlp", DENSE_MLP[leaf])] = (a.T, s * b.T)
        elif module in ("mlp.gate", "block_sparse_moe.gate") and model.is_moe:
            out[("moe", "gate")] = (a.T, s * b.T)
        elif module == "mlp.experts" and model.is_moe:
            out.update({("moe", n): p for n, p in _fused_experts(model, config, full, a, b).items()})
        else:
            raise PeftError(f"{full}: a module this {'MoE' if model.is_moe else 'dense'} model does not have")
    return out


def _per_expert(model: ModelConfig, config: dict, layer_tensors: dict) -> dict[tuple, tuple]:
    """transformers 4's block_sparse_moe.experts.E.w1/w2/w3 modules stacked per weight."""
    by_weight: dict[str, dict[int, tuple]] = {}
    for module, tensors in layer_tensors.items():
        ((full, pair),) = tensors.items()
        _, _, e, name = module.split(".")
        by_weight.setdefault(name, {})[int(e)] = (pair["A"].T, _scale(config, [full], pair["A"].shape[0]) * pair["B"].T)
    out = {}
    for name, experts in by_weight.items():
        if sorted(experts) != list(range(model.n_experts)):
            raise PeftError(f"adapters on {name} for experts {sorted(experts)}; serving needs all {model.n_experts}")
        out[("moe", name)] = tuple(np.stack([experts[e][i] for e in range(model.n_experts)]) for i in (0, 1))
    return out


def read(folder: str | Path, model: ModelConfig) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]:
    """{parameter path ("layers", block, weight): (A, B)} of the folder's adapters, scale
    folded into B, layers stacked on the leading axis."""
    folder = Path(folder)
    config = _settings(folder)
    layers: dict[tuple, dict[int, tuple]] = {}
    old_experts: dict[int, dict] = {}
    for (layer, module), tensors in _pairs_by_module(folder).items():
        if layer >= model.n_layers:
            raise PeftError(f"{folder}: adapters on layer {layer}; the model has {model.n_layers}")
        if module.startswith("block_sparse_moe.experts."):
            old_experts.setdefault(layer, {})[module] = tensors
            continue
        for key, pair in _layer_pairs(model, config, module, tensors).items():
            layers.setdefault(key, {})[layer] = pair
    for layer, tensors in old_experts.items():
        for key, pair in _per_expert(model, config, tensors).items():
            layers.setdefault(key, {})[layer] = pair
    if not layers:
        raise PeftError(f"{folder}: no LoRA tensors in adapter_model.safetensors")
    out = {}
    for (block, weight), per_layer in layers.items():
        a0, b0 = next(iter(per_layer.values()))
        zero = (np.zeros_like(a0), np.zeros_like(b0))
        stacked = [per_layer.get(i, zero) for i in range(model.n_layers)]
        out[("layers", block, weight)] = tuple(np.stack([p[i] for p in stacked]) for i in (0, 1))
    return out
