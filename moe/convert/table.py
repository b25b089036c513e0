"""The Hugging Face <-> moe mapping, declared once and used by both directions.

Weights: one `Rule` per tensor kind. Hugging Face stores linear weights (out, in) and one
tensor per layer and per expert; we store kernels (in, out) stacked on a leading layer
axis (and expert axis). A rule names both sides and the two reshapes between them.

Config: `model_config_from_hf` and `hf_config_from_model` map config.json to ModelConfig
and back, refusing every Hugging Face feature this model does not implement.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from moe.config import ConfigError, ModelConfig, validate_model

ARCHITECTURES = {"MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral"}


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted exactly; the message says why."""


# ----------------------------------------------------------------------------- weights


def _t(w, cfg):
    return np.ascontiguousarray(w.T)


def _proj_in(n_heads_attr):
    """HF [heads * head_dim, d_model] <-> ours [d_model, heads, head_dim] (q, k, v)."""

    def to_ours(w, cfg):
        return np.ascontiguousarray(w.T.reshape(cfg.d_model, getattr(cfg, n_heads_attr), cfg.resolved_head_dim))

    def to_hf(w, cfg):
        return np.ascontiguousarray(w.reshape(cfg.d_model, -1).T)

    def hf_shape(cfg):
        return (getattr(cfg, n_heads_attr) * cfg.resolved_head_dim, cfg.d_model)

    return to_ours, to_hf, hf_shape


def _o_to_ours(w, cfg):  # HF [d_model, heads * head_dim] -> ours [heads, head_dim, d_model]
    return np.ascontiguousarray(w.T.reshape(cfg.n_heads, cfg.resolved_head_dim, cfg.d_model))


def _o_to_hf(w, cfg):
    return np.ascontiguousarray(w.reshape(-1, cfg.d_model).T)


def _same(w, cfg):
    return w


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]  # path in our param tree
    hf: str  # Hugging Face name, with {layer} and {expert} placeholders
    to_ours: Callable
    to_hf: Callable
    hf_shape: Callable[[ModelConfig], tuple]

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.hf


def rules(cfg: ModelConfig) -> list[Rule]:
    d, f, v, e = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_experts
    layer = "model.layers.{layer}."
    q, k, vv = _proj_in("n_heads"), _proj_in("n_kv_heads"), _proj_in("n_kv_heads")
    table = [
        Rule(("embed", "embedding"), "model.embed_tokens.weight", _same, _same, lambda c: (v, d)),
        Rule(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", _same, _same, lambda c: (d,)),
        Rule(("layers", "attn", "q"), layer + "self_attn.q_proj.weight", *q),
        Rule(("layers", "attn", "k"), layer + "self_attn.k_proj.weight", *k),
        Rule(("layers", "attn", "v"), layer + "self_attn.v_proj.weight", *vv),
        Rule(
            ("layers", "attn", "o"),
            layer + "self_attn.o_proj.weight",
            _o_to_ours,
            _o_to_hf,
            lambda c: (d, c.n_heads * c.resolved_head_dim),
        ),
        Rule(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", _same, _same, lambda c: (d,)),
    ]
    if cfg.is_moe:
        moe = layer + "block_sparse_moe."
        table += [
            Rule(("layers", "moe", "gate"), moe + "gate.weight", _t, _t, lambda c: (e, d)),
            Rule(("layers", "moe", "w1"), moe + "experts.{expert}.w1.weight", _t, _t, lambda c: (f, d)),
            Rule(("layers", "moe", "w3"), moe + "experts.{expert}.w3.weight", _t, _t, lambda c: (f, d)),
            Rule(("layers", "moe", "w2"), moe + "experts.{expert}.w2.weight", _t, _t, lambda c: (d, f)),
        ]
    else:
        table += [
            Rule(("layers", "mlp", "w1"), layer + "mlp.gate_proj.weight", _t, _t, lambda c: (f, d)),
            Rule(("layers", "mlp", "w3"), layer + "mlp.up_proj.weight", _t, _t, lambda c: (f, d)),
            Rule(("layers", "mlp", "w2"), layer + "mlp.down_proj.weight", _t, _t, lambda c: (d, f)),
        ]
    table += [
        Rule(("final_norm", "scale"), "model.norm.weight", _same, _same, lambda c: (d,)),
        Rule(("lm_head", "kernel"), "lm_head.weight", _t, _t, lambda c: (v, d)),
    ]
    return table


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor: its name, its rule and its slice of our stacked array."""

    hf_name: str
    rule: Rule
    index: tuple[int, ...]  # (layer,), (layer, expert) or ()


def entries(cfg: ModelConfig) -> Iterator[Entry]:
    """Every Hugging Face tensor of the model, in checkpoint order (layer by layer)."""
    table = rules(cfg)
    for rule in table:
        if not rule.per_layer:
            if rule.ours[0] != "lm_head" and rule.ours[0] != "final_norm":
                yield Entry(rule.hf, rule, ())
    for layer in range(cfg.n_layers):
        for rule in table:
            if not rule.per_layer:
                continue
            if rule.per_expert:
                for expert in range(cfg.n_experts):
                    yield Entry(rule.hf.format(layer=layer, expert=expert), rule, (layer, expert))
            else:
                yield Entry(rule.hf.format(layer=layer), rule, (layer,))
    for rule in table:
        if rule.ours[0] in ("lm_head", "final_norm"):
            yield Entry(rule.hf, rule, ())


# ----------------------------------------------------------------------------- config

_UNSUPPORTED = {  # HF field -> (value we implement, what it would change)
    "tie_word_embeddings": (False, "tied input and output embeddings"),
    "attention_bias": (False, "biases in the attention projections"),
    "mlp_bias": (False, "biases in the MLP"),
    "hidden_act": ("silu", "the MLP activation"),
    "rope_scaling": (None, "scaled rotary embeddings"),
}


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(
            f"config.json: rope_parameters.rope_type '{rope_type}' is not supported; "
            "only the default rotary embedding is implemented"
        )
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ConversionError("config.json has no rope_theta (top level or in rope_parameters)")
    return float(theta)


def model_config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict; refuses what we do not implement."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    kind = ARCHITECTURES.get(arch) if arch else hf.get("model_type")
    if kind not in ("mistral", "mixtral"):
        raise ConversionError(
            f"config.json: architecture {arch or hf.get('model_type')!r} is not supported; "
            f"expected one of {sorted(ARCHITECTURES)}"
        )
    for field, (ours, meaning) in _UNSUPPORTED.items():
        value = hf.get(field, ours)
        if value != ours and not (field == "hidden_act" and value == "swish"):
            raise ConversionError(
                f"config.json: {field}={value!r} ({meaning}) is not implemented; only {field}={ours!r} converts exactly"
            )
    n_heads = hf["num_attention_heads"]
    try:
        cfg = ModelConfig(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim"),
            d_ff=hf["intermediate_size"],
            n_experts=hf["num_local_experts"] if kind == "mixtral" else 0,
            top_k=hf.get("num_experts_per_tok", 2) if kind == "mixtral" else 2,
            rope_theta=_rope_theta(hf),
            sliding_window=hf.get("sliding_window"),
            max_seq_len=hf.get("max_position_embeddings", 32768),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            param_dtype="bfloat16" if _hf_dtype(hf) == "bfloat16" else "float32",
            bos_id=hf.get("bos_token_id") or 1,
            eos_id=_first(hf.get("eos_token_id"), 2),
        )
        validate_model(cfg)
    except KeyError as e:
        raise ConversionError(f"config.json is missing the field {e.args[0]!r}") from None
    except ConfigError as e:
        raise ConversionError(f"config.json describes an invalid model: {e}") from None
    if cfg.head_dim == cfg.d_model // cfg.n_heads:
        cfg = dataclasses.replace(cfg, head_dim=None)
    return cfg


def _first(value, default):
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


def _hf_dtype(hf: dict) -> str:
    return str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")


def hf_config_from_model(cfg: ModelConfig, dtype: str) -> dict:
    """A complete config.json for MistralForCausalLM or MixtralForCausalLM."""
    arch = "MixtralForCausalLM" if cfg.is_moe else "MistralForCausalLM"
    hf = {
        "architectures": [arch],
        "model_type": ARCHITECTURES[arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.rms_norm_eps,
        "use_cache": True,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "sliding_window": cfg.sliding_window,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_id,
        "pad_token_id": None,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if cfg.is_moe:
        hf.update(
            num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.top_k,
            router_aux_loss_coef=0.02,
            output_router_logits=False,
            router_jitter_noise=0.0,
        )
    return hf
