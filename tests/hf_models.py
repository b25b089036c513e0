"""Small random Mistral and Mixtral models built in transformers, saved as HF folders."""

import torch
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

SEQ = 12
COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,
    rms_norm_eps=2e-4,
)  # not the default of either class
QWEN_IDS = dict(bos_token_id=1, eos_token_id=2)  # Qwen3MoeConfig leaves them unset; ours always has both
VARIANTS = {
    "mixtral": (MixtralForCausalLM, MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=3, rope_theta=3e5)),
    "mistral-window": (MistralForCausalLM, MistralConfig, dict(sliding_window=5, rope_theta=5e4)),
    "mistral-head-dim": (MistralForCausalLM, MistralConfig, dict(head_dim=16, sliding_window=None, rope_theta=2e3)),
    # qk-norm, head_dim apart from d_model / n_heads, experts narrower than the (unused) dense width
    "qwen3-moe": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig,
        dict(
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=24,
            norm_topk_prob=True,
            head_dim=16,
            rope_theta=1e6,
            **QWEN_IDS,
        ),
    ),
    "qwen3-moe-raw-topk": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig,
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            norm_topk_prob=False,
            rope_theta=5e4,
            **QWEN_IDS,
        ),
    ),
}


def make_hf(tmp_path, variant, dtype=torch.float32, seed=0):
    model_cls, config_cls, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**COMMON, **extra))
    with torch.no_grad():  # transformers sets every norm weight to 1: make each one distinct
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):
                weight.uniform_(0.5, 1.5)
    model = model.to(dtype)
    path = tmp_path / f"hf-{variant}"
    model.save_pretrained(path)
    return path


def stdlib_mixtral(path, tokenizer, seed: int, max_positions: int):
    """A random Mixtral over the shipped 4096-token stdlib tokenizer, saved with it at path."""
    import shutil

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=4096,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=max_positions,
        initializer_range=0.2,
    )
    MixtralForCausalLM(config).save_pretrained(path)
    shutil.copy(tokenizer, path / "tokenizer.model")
    return path
