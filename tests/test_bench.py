"""`moe bench`'s pieces on a tiny model: every dispatch path timed, the table printed."""

import pytest

from moe.bench import training as bench
from moe.model.dispatch import DISPATCH, resolve

from helpers import tiny_model


def test_layer_timings_cover_every_path_and_the_table_names_the_default():
    paths = set(DISPATCH) - {"gather", "megablox"}  # the few-token (decoding) path; a TPU kernel (interpreted here)
    assert set(bench.moe_layer(tiny_model(dtype="bfloat16"), tokens=32, repeats=1)) >= paths
    layer = bench.moe_layer(tiny_model(), tokens=64, repeats=1)
    assert set(layer) == {*paths, "dense_swiglu_equal_active"} and all(t > 0 for t in layer.values())
    step = {"tokens_per_s": 10.0, "mfu": 0.1}
    result = {
        "backend": "cpu",
        "device": "cpu",
        "matmul_peak_flops": 1e11,
        "matmul_peak_flops_bf16": 1e11,
        "moe_layer_s": layer,
        "default_dispatch": resolve("auto"),
        "bench-moe": step,
        "tiny-moe": step,
        "peak_rss_bytes": 2**30,
        "hf_tokens_per_s": None,
    }
    table = bench.format_table(result)
    assert f"{resolve('auto'):<28}" in table and "<- default here" in table
    assert table.count("x dense") == len(layer)
    result["moe_layer_mfu"] = {name: 0.5 for name in layer}
    assert bench.format_table(result).count("x dense   MFU 50.0%") == len(layer)


def test_layer_flops_agree_with_xla_count_for_the_equal_active_dense_swiglu():
    """The layer MFU's numerator against XLA's own FLOP count of the dense SwiGLU's
    forward+backward (whose elementwise work adds about a percent here)."""
    import jax
    import jax.numpy as jnp

    cfg, tokens = tiny_model(d_model=128, d_ff=256), 64
    width = cfg.top_k * cfg.d_ff
    x, a, b, c = (
        jnp.ones(shape)
        for shape in ((tokens, cfg.d_model), (cfg.d_model, width), (cfg.d_model, width), (width, cfg.d_model))
    )
    grad = jax.jit(jax.grad(bench.dense_swiglu_loss, argnums=(0, 1, 2, 3)))
    cost = grad.lower(x, a, b, c).compile().cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert 1.0 <= xla_flops / bench.layer_flops(cfg, tokens) < 1.03


def test_the_default_path_and_the_dense_reference_are_timed_in_turns():
    """_alternating warms each call once, then times them in turn, so a ratio of two of them
    shares the machine's minutes; one median per call."""
    order = []
    calls = [(lambda i: order.append(("grouped", i)) or i, (1,)), (lambda i: order.append(("dense", i)) or i, (2,))]
    times = bench._alternating(calls, repeats=3)
    assert order == [("grouped", 1), ("dense", 2)] * 4
    assert len(times) == 2 and all(t >= 0 for t in times)


def test_the_host_cpu_is_named_from_cpuinfo():
    core = "processor\t: {}\nmodel name\t: AMD EPYC\ncpu family\t: 26\nmodel\t\t: 2\nflags\t\t: fpu avx2 {}\n\n"
    assert (
        bench.host_cpu(core.format(0, "avx512f") + core.format(1, "avx512f"))
        == "AMD EPYC, family 26 model 2, 2 cores, avx512f"
    )
    assert bench.host_cpu(core.format(0, "avx512bw")).endswith("1 cores, no avx512f")
    assert bench.host_cpu("")  # no /proc/cpuinfo: the platform module's name and os.cpu_count()


@pytest.mark.slow
def test_the_serving_bench_counts_every_requested_token():
    from moe.bench import serve

    small = ["model.vocab_size=512", "model.max_seq_len=32", "train.seq_len=32"]
    lengths = dict(prompt_range=(2, 12), answer_range=(2, 6))
    result = serve.run("tiny-moe", clients=(1, 3), per_client=1, overrides=small, **lengths)
    assert [r["requests"] for r in result["engine"]] == [1, 3]
    work = serve.workload(512, 3, 0, **lengths)
    assert result["engine"][1]["tokens"] <= sum(work.lengths) and result["engine"][1]["tokens_per_s"] > 0
    assert all(r["time_to_first_token_s"]["p99"] > 0 for r in result["engine"])
    assert [g["batch"] for g in result["generate"]] == [1, 8] and "3 clients" in serve.format_table(result)
    mixed = result["adapters"]  # 8 clients, requests on the base and two adapters in turn
    assert mixed["requests"] == 8 and mixed["adapters"] == ["a", "b"] and 0 < mixed["tokens"] <= 8 * 6
