"""One MoE layer's forward and backward at equal active and total parameters, from
Mixtral's 8 experts (top-2) to finer ones: E experts of d_ff * 8 / E, top E / 4, on
bench-moe's d_model and 2048 tokens (4 x 512), float32, through each dispatch path that
trains on CPU. Prints ms per step and the ratio to 8 experts, measured in turns.

    python benchmarks/fine_grained.py
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe import config as config_lib
from moe.bench.training import _alternating
from moe.model.moe import SparseMoE

TOKENS, ROUNDS = (4, 512), 5
SHAPES = [(8, 2), (16, 4), (32, 8), (64, 16)]  # (experts, top_k): the same active and total parameters


def step_fn(cfg):
    x = jax.random.normal(jax.random.key(0), (*TOKENS, cfg.d_model))
    params = nn.unbox(SparseMoE(cfg).init(jax.random.key(1), x))["params"]

    def loss(p, x):
        y, stats = SparseMoE(cfg).apply({"params": p}, x)
        return jnp.sum(y * y) + jnp.sum(stats["prob_sum"])

    return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)


def main() -> None:
    base = config_lib.load("configs/bench-moe.yaml").model
    for dispatch in ("grouped", "sorted"):
        calls = []
        for experts, top_k in SHAPES:
            cfg = dataclasses.replace(
                base, n_experts=experts, top_k=top_k, d_ff=base.d_ff * 8 // experts, moe_dispatch=dispatch
            )
            calls.append(step_fn(cfg))
        times = _alternating(calls, ROUNDS)
        for (experts, top_k), t in zip(SHAPES, times):
            d_ff = base.d_ff * 8 // experts
            shape = f"{experts:3d} experts, top-{top_k:2d}, d_ff {d_ff:5d}"
            print(f"{dispatch:8s} {shape}: {t * 1e3:7.1f} ms  ({t / times[0]:.2f}x)")


if __name__ == "__main__":
    main()
