"""Where a batch-1 prefill's time goes: bench-moe (or the config given), one 64-token prompt,
float32, ours beside Hugging Face's MixtralForCausalLM on the same weights.

Ours, each part jitted and timed alone (median of rounds, in turns):
  generate(1)          `generate` with one new token (what `moe bench` counts as prefill)
  layouts              decode_layout twice: per-layer views for the prefill and the decode loop
  stacked, all logits  the 64-token chunk through the cached model over the stacked layers
                       (a scan), logits at every position (what prefill did before)
  per-layer, no head   the same over the per-layer views, no LM head (what prefill does now)
  moe blocks           the MoE blocks alone on [1, 64, d_model] (grouped dispatch)
  dense equivalent     as many SwiGLU blocks with top_k x d_ff, the same active FLOPs
HF: generate(1) and its forward with logits at every position and at the last one only.
Then one expert weight's products alone, 16 rows per expert (64 tokens x top-2 over 8
experts): the grouped matmul (moe/model/gmm.py) against plain dots in XLA and in torch.

    python benchmarks/prefill_parts.py [CONFIG]
"""

import dataclasses
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import moe.model as M
from moe import config as config_lib
from moe.bench.training import _alternating
from moe.convert.hf import save_hf
from moe.infer.decode import generate
from moe.infer.layout import decode_layout
from moe.model import kv_cache
from moe.model.layers import SwiGLU
from moe.model.moe import SparseMoE
from moe.model.transformer import Transformer

PROMPT, ROUNDS = 64, 15


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms"


def ours(cfg, params, prompt) -> dict:
    tokens = jnp.asarray([prompt], jnp.int32)
    positions = jnp.arange(PROMPT, dtype=jnp.int32)[None]
    cache = kv_cache.init(cfg, 1, kv_cache.slots_needed(cfg, PROMPT + 1))

    def forward(head, layer_list):
        model = Transformer(cfg, head=head, layer_list=layer_list)
        return jax.jit(lambda p, c: model.apply({"params": p}, tokens, positions, cache=c)[0])

    layer0 = jax.tree_util.tree_map(lambda a: a[0], params["layers"])
    moe_block, x = SparseMoE(cfg), jax.random.normal(jax.random.key(1), (1, PROMPT, cfg.d_model))
    dense_cfg = dataclasses.replace(cfg, d_ff=cfg.d_ff * cfg.top_k, n_experts=1, top_k=1)
    dense_params = SwiGLU(dense_cfg).init(jax.random.key(2), x)["params"]

    def every_layer(block, p):  # distinct inputs, so XLA cannot merge the calls into one
        def one(x):
            out = block.apply({"params": p}, x)
            return out[0] if isinstance(block, SparseMoE) else out

        return jax.jit(lambda x: sum(one(x + i) for i in range(cfg.n_layers)))

    calls = {
        "generate(1)": (lambda: generate(cfg, params, [prompt], 1), ()),
        "layouts": (lambda: (decode_layout(cfg, params, None), decode_layout(cfg, params, 1)), ()),
        "stacked, all logits": (forward(True, False), (params, cache)),
        "per-layer, no head": (forward(False, True), (decode_layout(cfg, params, None), kv_cache.as_layer_list(cache))),
        "moe blocks": (every_layer(moe_block, layer0["moe"]), (x,)),
        "dense equivalent": (every_layer(SwiGLU(dense_cfg), dense_params), (x,)),
    }
    times = _alternating(list(calls.values()), ROUNDS)
    return dict(zip(calls, times))


def hf(cfg, params, prompt) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        save_hf(cfg, params, folder, dtype="float32")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    calls = {
        "generate(1)": lambda: model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0),
        "forward, all logits": lambda: model(ids, logits_to_keep=0),
        "forward, last logits": lambda: model(ids, logits_to_keep=1),
    }
    times = {name: [] for name in calls}
    with torch.no_grad():
        for fn in calls.values():
            fn()
        for _ in range(ROUNDS):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def small_products(cfg) -> dict:
    """One expert weight's products at prefill: the grouped matmul over the sorted copies
    against the same 8 products as plain dots (XLA and torch)."""
    import torch

    from moe.model.dispatch import block_size
    from moe.model.gmm import gmm

    rows, n = PROMPT * cfg.top_k // cfg.n_experts, cfg.n_experts
    w = np.random.default_rng(0).standard_normal((n, cfg.d_model, cfg.d_ff), np.float32)
    x = np.random.default_rng(9).standard_normal((rows * n, cfg.d_model), np.float32)
    sizes = jnp.full((n,), rows, jnp.int32)
    block = block_size(rows * n, n)
    grouped = jax.jit(lambda x, w: gmm(x, w, sizes, block))
    dots = jax.jit(lambda x, ws: [x[e * rows : (e + 1) * rows] @ ws[e] for e in range(n)])
    xw, ws = (jnp.asarray(x), jnp.asarray(w)), (jnp.asarray(x), tuple(jnp.asarray(w[e]) for e in range(n)))
    grouped_s, dots_s = _alternating([(grouped, xw), (dots, ws)], 50)
    tx, tws = torch.from_numpy(x), [torch.from_numpy(w[e]) for e in range(n)]
    times = []
    for i in range(53):
        start = time.perf_counter()
        [tx[e * rows : (e + 1) * rows] @ tws[e] for e in range(n)]
        if i >= 3:
            times.append(time.perf_counter() - start)
    shape = f"{n} x [{rows}, {cfg.d_model}] x [{cfg.d_model}, {cfg.d_ff}]"
    return {
        f"grouped matmul, {shape}": grouped_s,
        f"plain dots (XLA), {shape}": dots_s,
        f"plain dots (torch), {shape}": float(np.median(times)),
    }


def main() -> None:
    cfg = config_lib.load(sys.argv[1] if len(sys.argv) > 1 else "configs/bench-moe.yaml").model
    cfg = dataclasses.replace(cfg, dtype="float32", param_dtype="float32")
    params = jax.tree_util.tree_map(np.asarray, M.init(cfg, jax.random.key(0)))
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, PROMPT).tolist()
    head_flops = 2 * PROMPT * cfg.d_model * cfg.vocab_size
    print(
        f"{cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}; LM head over "
        f"{PROMPT} positions: {head_flops / 1e9:.2f} GFLOP; jax {jax.__version__}"
    )
    for name, seconds in ours(cfg, params, prompt).items():
        print(f"ours {name:22s} {_ms(seconds)}")
    for name, seconds in hf(cfg, params, prompt).items():
        print(f"HF   {name:22s} {_ms(seconds)}")
    for name, seconds in small_products(cfg).items():
        print(f"{name:62s} {_ms(seconds)}")


if __name__ == "__main__":
    main()
