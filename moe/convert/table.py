"""The Hugging Face <-> moe mapping, declared once and used by both directions.

Weights: one `Rule` per tensor kind. Hugging Face stores linear weights (out, in) and one
tensor per layer and per expert; we store kernels (in, out) stacked on a leading layer
axis (and expert axis). A rule names both sides and the two reshapes between them.

Config: `model_config_from_hf` and `hf_config_from_model` map config.json to ModelConfig
and back, refusing every Hugging Face feature this model does not implement.

Three Hugging Face families: MistralForCausalLM (dense), MixtralForCausalLM (sparse,
softmax top-k renormalized) and Qwen3MoeForCausalLM (sparse with qk-norm, norm_topk_prob
either way, head_dim apart from d_model / n_heads). `family` says which one a ModelConfig
exports as, or why none holds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from moe.config import ConfigError, ModelConfig, validate_model

ARCHITECTURES = {
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
CLASS_OF = {kind: arch for arch, kind in ARCHITECTURES.items()}


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


def family(cfg: ModelConfig) -> str:
    """ "mistral", "mixtral" or "qwen3_moe": the Hugging Face family that holds this model
    exactly; ConversionError naming what none of them has."""
    if cfg.is_moe and cfg.qk_norm:
        kind = "qwen3_moe"
    elif cfg.qk_norm:
        raise ConversionError("model.qk_norm on a dense model: no supported Hugging Face class has it")
    else:
        kind = "mixtral" if cfg.is_moe else "mistral"
    beyond = {  # ModelConfig fields no supported Hugging Face class holds, with the value it holds
        "n_shared_experts": 0,
        "router_scores": "softmax",
        "routed_scale": 1.0,
    }
    if cfg.balance == "bias":
        raise ConversionError(
            "model.balance=bias: the per-expert bias on the router's choice has no place in "
            f"Hugging Face's {CLASS_OF[kind]}; it converts only to this project's checkpoints"
        )
    if kind == "mixtral":
        beyond["norm_topk"] = True
    if kind == "qwen3_moe":
        beyond["sliding_window"] = None
    for field, value in beyond.items():
        if getattr(cfg, field) != value:
            raise ConversionError(
                f"model.{field}={getattr(cfg, field)!r} has no place in Hugging Face's {CLASS_OF[kind]} "
                f"(which has {field}={value!r}); it converts only to this project's checkpoints"
            )
    return kind


def rules(cfg: ModelConfig) -> list[Rule]:
    d, f, v, e, hd = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_experts, cfg.resolved_head_dim
    kind = family(cfg)
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
    if cfg.qk_norm:
        table += [
            Rule(
                ("layers", "attn", f"{n}_norm", "scale"),
                layer + f"self_attn.{n}_norm.weight",
                _same,
                _same,
                lambda c: (hd,),
            )
            for n in ("q", "k")
        ]
    if cfg.is_moe:
        moe = layer + ("block_sparse_moe." if kind == "mixtral" else "mlp.")
        w1, w3, w2 = ("w1", "w3", "w2") if kind == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        table += [
            Rule(("layers", "moe", "gate"), moe + "gate.weight", _t, _t, lambda c: (e, d)),
            Rule(("layers", "moe", "w1"), moe + f"experts.{{expert}}.{w1}.weight", _t, _t, lambda c: (f, d)),
            Rule(("layers", "moe", "w3"), moe + f"experts.{{expert}}.{w3}.weight", _t, _t, lambda c: (f, d)),
            Rule(("layers", "moe", "w2"), moe + f"experts.{{expert}}.{w2}.weight", _t, _t, lambda c: (d, f)),
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


def _qwen3_moe_fields(hf: dict) -> dict:
    """ModelConfig fields of a Qwen3MoeForCausalLM config.json; refuses its dense layers and window."""
    if hf.get("use_sliding_window"):
        raise ConversionError(
            "config.json: use_sliding_window=true (Qwen3's window on some layers) is not implemented; "
            "only use_sliding_window=false converts exactly"
        )
    dense = [i for i in range(hf["num_hidden_layers"]) if not _qwen3_sparse(hf, i)]
    if dense:
        raise ConversionError(
            f"config.json: layers {dense[:8]} have a dense MLP (mlp_only_layers / decoder_sparse_step); "
            "a model with both dense and MoE layers is not implemented"
        )
    return dict(
        d_ff=hf["moe_intermediate_size"],
        n_experts=hf.get("num_experts", hf.get("num_local_experts")),
        top_k=hf["num_experts_per_tok"],
        norm_topk=bool(hf.get("norm_topk_prob", False)),
        qk_norm=True,
        sliding_window=None,
    )


def _qwen3_sparse(hf: dict, layer: int) -> bool:
    """As Qwen3MoeDecoderLayer decides: an MoE MLP unless listed in mlp_only_layers or off the step."""
    step = hf.get("decoder_sparse_step", 1)
    return layer not in (hf.get("mlp_only_layers") or []) and (layer + 1) % step == 0


def model_config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict; refuses what we do not implement."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    kind = ARCHITECTURES.get(arch) if arch else hf.get("model_type")
    if kind not in CLASS_OF:
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
        fields = dict(d_ff=hf["intermediate_size"], n_experts=0, sliding_window=hf.get("sliding_window"))
        if kind == "mixtral":
            fields.update(n_experts=hf["num_local_experts"], top_k=hf.get("num_experts_per_tok", 2))
        elif kind == "qwen3_moe":
            fields.update(_qwen3_moe_fields(hf))
        cfg = ModelConfig(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim"),
            rope_theta=_rope_theta(hf),
            max_seq_len=hf.get("max_position_embeddings", 32768),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            param_dtype="bfloat16" if _hf_dtype(hf) == "bfloat16" else "float32",
            bos_id=hf.get("bos_token_id") or 1,
            eos_id=_first(hf.get("eos_token_id"), 2),
            **fields,
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
    """A complete config.json for MistralForCausalLM, MixtralForCausalLM or Qwen3MoeForCausalLM."""
    kind = family(cfg)
    hf = {
        "architectures": [CLASS_OF[kind]],
        "model_type": kind,
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
    if kind == "mixtral":
        hf.update(
            num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.top_k,
            router_aux_loss_coef=0.02,
            output_router_logits=False,
            router_jitter_noise=0.0,
        )
    if kind == "qwen3_moe":
        hf.update(
            moe_intermediate_size=cfg.d_ff,
            num_experts=cfg.n_experts,
            num_experts_per_tok=cfg.top_k,
            norm_topk_prob=cfg.norm_topk,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            use_sliding_window=False,
            attention_bias=False,
            router_aux_loss_coef=0.001,
            output_router_logits=False,
        )
    return hf
