"""`moe bench`: speed of the MoE layer and the train step, measured in one run.

Prints a table and optionally writes JSON: the backend's matmul peak (float32, bfloat16);
MoE layer forward+backward per dispatch path against a dense SwiGLU of the same active
FLOPs; train-step tokens/s and MFU for bench-moe and tiny-moe (against the float32 peak
measured here); peak memory; and Hugging Face's MixtralForCausalLM on the same config,
batch and AdamW when torch and transformers are installed (bench-moe's steps and HF's in
alternating rounds, medians compared), and decoding beside HF's generate (moe/bench/decode.py).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moe import config as config_lib
from moe import progress
from moe.bench.decode import decode_bench, format_lines
from moe.model.dispatch import DISPATCH, resolve
from moe.model.params import count_params
from moe.training import step as train_lib
from moe.training.metrics import measured_matmul_flops


def host_cpu(cpuinfo: str | None = None) -> str:
    """The host's CPU, as /proc/cpuinfo names it: model, family and model numbers, cores, and
    whether it has AVX-512. Machines of one kind come with different CPUs, whose matmul
    peaks differ by up to 2x, so every recorded run names its own."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    fields, cores = {}, 0
    for line in cpuinfo.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        cores += key == "processor"
        fields.setdefault(key, value)
    if "model name" not in fields:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    vector = "avx512f" if "avx512f" in fields.get("flags", "").split() else "no avx512f"
    return (
        f"{fields['model name']}, family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, "
        f"{cores} cores, {vector}"
    )


def _time(fn, *args, repeats: int) -> float:
    """Median seconds of fn(*args) after one warm-up (compile) call."""
    return _alternating([(fn, args)], repeats)[0]


def _alternating(calls, repeats: int) -> list[float]:
    """Median seconds of each (fn, args) in `calls`, after one warm-up (compile) call each,
    timed in turn `repeats` times: calls compared with each other share the same minutes."""
    for fn, args in calls:
        jax.block_until_ready(fn(*args))
    times = [[] for _ in calls]
    for _ in range(repeats):
        for (fn, args), own in zip(calls, times):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            own.append(time.perf_counter() - start)
    return [float(np.median(own)) for own in times]


def moe_layer(cfg: config_lib.ModelConfig, tokens: int, repeats: int) -> dict:
    """Forward+backward seconds of each dispatch path and of the equal-active dense SwiGLU,
    in the config's compute dtype (the router in float32, as in the model), each compiled
    with the train step's XLA options. The default path and the dense SwiGLU, whose ratio
    is the number that counts, are timed alternately: this machine drifts by 10-15% from
    minute to minute, more than the ratio's margin."""
    keys = jax.random.split(jax.random.key(0), 6)
    d, f, e, k, dt = cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k, jnp.dtype(cfg.dtype)
    x = jax.random.normal(keys[0], (tokens, d), dt)
    w1, w3 = (jax.random.normal(kk, (e, d, f), dt) * 0.02 for kk in keys[1:3])
    w2 = jax.random.normal(keys[3], (e, f, d), dt) * 0.02
    gate = jax.random.normal(keys[4], (d, e)) * 0.02

    def moe_loss(x, w1, w3, w2, gate, fn):
        probs = jax.nn.softmax(x.astype(jnp.float32) @ gate)
        weight, idx = jax.lax.top_k(probs, k)
        y = fn(
            x, idx, (weight / weight.sum(-1, keepdims=True)).astype(dt), w1, w3, w2, recompute_gated=cfg.recompute_gated
        )  # as the train step's layer does
        return jnp.sum(y.astype(jnp.float32) ** 2)

    options, steps, default = train_lib.compiler_options(), {}, resolve("auto")
    for name, fn in DISPATCH.items():
        if name == "gather":  # for a few tokens (decoding): it would copy each copy's expert weights
            continue
        if name == "megablox" and jax.default_backend() != "tpu":  # a TPU kernel, only interpreted elsewhere
            continue
        steps[name] = jax.jit(
            jax.grad(lambda *a, fn=fn: moe_loss(*a, fn), argnums=(0, 1, 2, 3, 4)), compiler_options=options
        )
    out = {name: _time(step, x, w1, w3, w2, gate, repeats=repeats) for name, step in steps.items() if name != default}
    v1, v3 = (jax.random.normal(kk, (d, k * f), dt) * 0.02 for kk in keys[1:3])
    v2 = jax.random.normal(keys[3], (k * f, d), dt) * 0.02
    dense = jax.jit(jax.grad(dense_swiglu_loss, argnums=(0, 1, 2, 3)), compiler_options=options)
    out[default], out["dense_swiglu_equal_active"] = _alternating(
        [(steps[default], (x, w1, w3, w2, gate)), (dense, (x, v1, v3, v2))], repeats
    )
    return {name: out[name] for name in (*steps, "dense_swiglu_equal_active")}


def dense_swiglu_loss(x, w1, w3, w2):
    """The layer benchmark's reference: a dense SwiGLU (plain JAX, nothing rematerialized or
    saved by hand) under a sum-of-squares loss."""
    return jnp.sum(((jax.nn.silu(x @ w1) * (x @ w3)) @ w2).astype(jnp.float32) ** 2)


def layer_flops(cfg: config_lib.ModelConfig, tokens: int) -> int:
    """FLOPs of the MoE layer's forward+backward that count: the three products of the
    top_k experts each token meets (2 forward, 4 backward per multiply-add; the router's
    products left out), equal to the equal-active dense SwiGLU's."""
    return 6 * 3 * tokens * cfg.d_model * cfg.top_k * cfg.d_ff


def train_stepper(cfg: config_lib.Config):
    """(run(steps) -> seconds per step of the real jitted train step on random tokens,
    flops_per_token); compiled (one step) before it returns."""
    state = train_lib.init_state(cfg, jax.random.key(0))
    step, _ = train_lib.jit_steps(cfg, train_lib.make_optimizer(cfg, state.params))
    b, s = cfg.train.batch_size, cfg.train.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (b, s + 1)).astype(np.int32)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((b, s), np.int32),
        "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
    }
    box = [step(state, batch)[0]]  # the state, donated and replaced by every step
    jax.block_until_ready(box[0])

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            box[0], m = step(box[0], batch)
        jax.block_until_ready(m)
        return (time.perf_counter() - start) / steps

    return run, train_lib.flops_per_token(cfg, count_params(cfg.model).active)


def train_step(cfg: config_lib.Config, steps: int) -> dict:
    """tokens/s and step time of the real jitted train step on random tokens."""
    run, flops_per_token = train_stepper(cfg)
    seconds = run(steps)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    return {"step_s": seconds, "tokens_per_s": tokens / seconds, "flops_per_token": flops_per_token}


def hf_stepper(cfg: config_lib.Config):
    """run(steps) -> seconds per step of transformers' MixtralForCausalLM with torch AdamW,
    same config and batch (one warm-up step done); None without torch and transformers."""
    try:  # optional (the test extra): the Hugging Face reference
        import torch
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError:
        return None
    m = cfg.model
    torch.manual_seed(0)
    model = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=m.vocab_size,
            hidden_size=m.d_model,
            intermediate_size=m.d_ff,
            num_hidden_layers=m.n_layers,
            num_attention_heads=m.n_heads,
            num_key_value_heads=m.n_kv_heads,
            num_local_experts=m.n_experts,
            num_experts_per_tok=m.top_k,
            max_position_embeddings=m.max_seq_len,
            output_router_logits=True,
            router_aux_loss_coef=cfg.train.aux_loss_coef,
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, m.vocab_size, (cfg.train.batch_size, cfg.train.seq_len))

    def one():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    one()

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            one()
        return (time.perf_counter() - start) / steps

    return run


def side_by_side(ours, hf, rounds: int, steps: int) -> tuple[list[float], list[float]]:
    """Seconds per step of ours and HF's, `steps` each, alternating for `rounds` rounds: the
    machine's speed drifts by 10-15% from minute to minute, so each pair shares its minute."""
    ours_s, hf_s = [], []
    for _ in range(rounds):
        ours_s.append(ours(steps))
        if hf is not None:
            hf_s.append(hf(steps))
    return ours_s, hf_s


# the matmul peak is the best of these [m, k, n] shapes, measured in the same run: squares, and
# the bench-moe step's own (tokens x d_model x d_ff, back, the weight gradient, the lm_head)
PEAK_SHAPES = (
    (1024, 1024, 1024),
    (2048, 2048, 2048),
    (2048, 512, 1792),
    (2048, 1792, 512),
    (512, 2048, 1792),
    (2048, 512, 32000),
)


def _shape_name(shape) -> str:
    return "x".join(map(str, shape))


def matmul_flops_by_shape(dtype) -> dict[str, float]:
    """FLOP/s of XLA's matmul for each of PEAK_SHAPES here, now."""
    return {_shape_name(shape): measured_matmul_flops(dtype, shape) for shape in PEAK_SHAPES}


def torch_matmul_flops_by_shape(repeats: int = 5) -> dict[str, float] | None:
    """The same for torch's float32 matmul: the peak Hugging Face's step runs against."""
    try:  # optional (the test extra)
        import torch
    except ImportError:
        return None
    out = {}
    for m, k, n in PEAK_SHAPES:
        a, b = torch.ones((m, k)), torch.ones((k, n))
        a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        out[_shape_name((m, k, n))] = 2 * m * k * n * repeats / (time.perf_counter() - start)
    return out


def run(quick: bool, dtype: str = "float32") -> dict:
    """Every measurement; the layer and the train steps compute in `dtype` (float32 or
    bfloat16), and MFU is taken against the matmul peak of that dtype measured here."""
    repeats, steps = (3, 2) if quick else (10, 3)  # steps per round (3 rounds beside HF; tiny-moe: once)
    result = {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "dtype": dtype,
        "host": host_cpu(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }
    stages = progress.bar(desc="bench", total=5, unit="stage")
    stages.set_postfix_str("matmul peak")
    for suffix, matmul_dtype in (("", jnp.float32), ("_bf16", jnp.bfloat16)):
        result["matmul_flops_by_shape" + suffix] = by_shape = matmul_flops_by_shape(matmul_dtype)
        result["matmul_peak_flops" + suffix] = max(by_shape.values())
    peak = result["matmul_peak_flops_bf16" if dtype == "bfloat16" else "matmul_peak_flops"]
    overrides = [f"model.dtype={dtype}"]
    bench = config_lib.load("bench-moe", overrides)
    tokens = bench.train.batch_size * bench.train.seq_len
    _next(stages, "MoE layer by dispatch")
    layer = moe_layer(bench.model, tokens, repeats)
    result["moe_layer_s"] = layer
    result["default_dispatch"] = resolve("auto")
    result["moe_vs_dense_ratio"] = layer[result["default_dispatch"]] / layer["dense_swiglu_equal_active"]
    # what fraction of the matmul peak a layer of nothing but the SwiGLU's products reaches
    flops = layer_flops(bench.model, tokens)
    result["moe_layer_mfu"] = {name: flops / s / peak for name, s in layer.items()}
    # bench-moe beside Hugging Face, alternating: on CPU in float32 (torch's CPU bfloat16 is not its fast path)
    _next(stages, "bench-moe train steps beside Hugging Face")
    ours_run, flops_per_token = train_stepper(bench)
    hf_run = hf_stepper(bench) if jax.default_backend() == "cpu" and dtype == "float32" else None
    ours_s, hf_s = side_by_side(ours_run, hf_run, rounds=1 if quick else 3, steps=steps)
    del ours_run, hf_run
    result["bench-moe"] = {
        "step_s": float(np.median(ours_s)),
        "tokens_per_s": tokens / float(np.median(ours_s)),
        "flops_per_token": flops_per_token,
        "tokens_per_s_by_round": [tokens / t for t in ours_s],
    }
    _next(stages, "tiny-moe train steps")
    tiny = train_step(config_lib.load("tiny-moe", overrides), steps)
    result["tiny-moe"] = tiny
    for r in (result["bench-moe"], tiny):
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak
    result["train_tokens_per_s"] = result["bench-moe"]["tokens_per_s"]
    result["mfu"] = result["bench-moe"]["mfu"]
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hf = tokens / float(np.median(hf_s)) if hf_s else None
    result["hf_tokens_per_s"] = hf
    result["hf_tokens_per_s_by_round"] = [tokens / t for t in hf_s] if hf_s else None
    result["ratio_vs_hf"] = None if hf is None else result["train_tokens_per_s"] / hf
    result["ratio_vs_hf_by_round"] = [h / o for o, h in zip(ours_s, hf_s)] if hf_s else None
    torch_by_shape = torch_matmul_flops_by_shape() if hf is not None else None
    result["torch_matmul_flops_by_shape"] = torch_by_shape
    torch_peak = result["torch_matmul_peak_flops"] = None if hf is None else max(torch_by_shape.values())
    for name in ("bench-moe", "tiny-moe"):  # our MFU against torch's peak too
        r = result[name]
        r["mfu_vs_torch_peak"] = None if hf is None else r["tokens_per_s"] * r["flops_per_token"] / torch_peak
    result["hf_mfu_vs_torch_peak"] = None if hf is None else hf * result["bench-moe"]["flops_per_token"] / torch_peak
    result["hf_mfu"] = None if hf is None else hf * result["bench-moe"]["flops_per_token"] / peak
    _next(stages, "decoding beside Hugging Face")
    if hf is not None:  # decoding, beside HF's generate on the same weights
        result["decode"] = {
            name: decode_bench(config_lib.load(name).model, new=16 if quick else 64)
            for name in (("tiny-moe",) if quick else ("tiny-moe", "bench-moe"))
        }
    stages.update()
    stages.close()
    return result


def _next(stages, what: str) -> None:
    stages.update()
    stages.set_postfix_str(what)


def format_table(r: dict) -> str:
    layer = r["moe_layer_s"]
    dense = layer["dense_swiglu_equal_active"]
    lines = [
        f"backend {r['backend']} ({r['device']}), compute dtype {r.get('dtype', 'float32')}, "
        f"host {r.get('host', 'not recorded')}, GLIBC_TUNABLES {r.get('glibc_tunables') or 'unset'}",
        f"matmul peak (best of the shapes below): float32 {r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s, "
        f"bfloat16 {r['matmul_peak_flops_bf16'] / 1e9:.1f} GFLOP/s",
    ]
    for key, label in (
        ("matmul_flops_by_shape", "xla float32"),
        ("matmul_flops_by_shape_bf16", "xla bfloat16"),
        ("torch_matmul_flops_by_shape", "torch float32"),
    ):
        if r.get(key):
            lines.append(f"  {label:<14}" + "  ".join(f"{s} {v / 1e9:.0f}" for s, v in r[key].items()))
    lines.append("MoE layer forward+backward (bench-moe, one batch of tokens):")
    for name, seconds in layer.items():
        mark = "  <- default here" if name == r["default_dispatch"] else ""
        mfu = f"   MFU {r['moe_layer_mfu'][name]:5.1%}" if r.get("moe_layer_mfu") else ""
        lines.append(f"  {name:<28}{seconds * 1e3:9.1f} ms   {seconds / dense:5.2f}x dense{mfu}{mark}")
    for name in ("bench-moe", "tiny-moe"):
        t = r[name]
        vs_torch = f", {t['mfu_vs_torch_peak']:.1%} of torch's" if t.get("mfu_vs_torch_peak") else ""
        lines.append(
            f"train step {name:<10} {t['tokens_per_s']:9.0f} tokens/s  MFU {t['mfu']:.1%} of XLA's peak{vs_torch}"
        )
    lines.append(f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
    if r["hf_tokens_per_s"] is not None:
        lines.append(
            f"Hugging Face MixtralForCausalLM (bench-moe): {r['hf_tokens_per_s']:.0f} tokens/s; "
            f"ours / HF = {r['ratio_vs_hf']:.2f} (medians of rounds of ours then HF's steps)"
        )
        if r.get("ratio_vs_hf_by_round"):
            lines.append(
                "  by round: "
                + ", ".join(
                    f"{o:.0f} / {h:.0f} = {q:.2f}"
                    for o, h, q in zip(
                        r["bench-moe"]["tokens_per_s_by_round"],
                        r["hf_tokens_per_s_by_round"],
                        r["ratio_vs_hf_by_round"],
                    )
                )
            )
        lines.append(
            f"  torch float32 matmul peak {r['torch_matmul_peak_flops'] / 1e9:.1f} GFLOP/s; HF's step at "
            f"{r['hf_mfu_vs_torch_peak']:.1%} of it, {r['hf_mfu']:.1%} of XLA's (same FLOPs per token as ours)"
        )
    if r.get("decode"):
        for name, decode in r["decode"].items():
            lines += format_lines(name, decode)
    return "\n".join(lines)


def main(quick: bool, json_path: str | None, dtype: str = "float32") -> None:
    result = run(quick, dtype)
    print(format_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
