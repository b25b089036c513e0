"""Small configs shared by the tests."""

import dataclasses
from pathlib import Path

from moe.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def tiny_model(**overrides) -> ModelConfig:
    base = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                       n_experts=4, top_k=2, rope_theta=10000.0, max_seq_len=64, init_std=0.1)
    return dataclasses.replace(base, **overrides)
