"""`moe aot` on TPU topologies, compiled on this CPU host with libtpu."""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from moe.config import ConfigError
from moe.plan import aot

from helpers import IN_CI, ROOT

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU and not IN_CI, reason="libtpu not installed (pip install -e '.[tpu]'); CI installs it"
)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("v5p-8", ("v5p", "v5p:2x2x1", 4)),
        ("v5p-16", ("v5p", "v5p:2x2x2", 8)),
        ("v5p-128", ("v5p", "v5p:4x4x4", 64)),
        ("v5e-16", ("v5e", "v5e:4x4", 16)),
        ("v4-32", ("v4", "v4:2x2x4", 16)),
        ("v5p:2x2x2", ("v5p", "v5p:2x2x2", 8)),
    ],
)
def test_topology_names(name, expected):
    assert aot.parse_topology(name) == expected


def test_unknown_topology_is_refused():
    with pytest.raises(ConfigError, match="unknown topology 'v9-8'"):
        aot.parse_topology("v9-8")


def moe_aot(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(
        [sys.executable, "-m", "moe", "aot", *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


@needs_libtpu
@pytest.mark.slow
def test_tiny_moe_compiles_for_a_small_v5p_slice():
    # a small vocabulary so that the experts dominate the FLOPs
    result = moe_aot(
        ROOT / "configs/tiny-moe.yaml",
        "--topology",
        "v5p-8",
        "mesh.data=2",
        "mesh.expert=2",
        "model.vocab_size=512",
        "model.d_ff=1024",
        "model.n_layers=1",
        "model.moe_dispatch=ragged",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "topology v5p-8: 4 chips" in out and "'expert': 2" in out and "FITS" in out
    # XLA lowers ragged_dot to its own Mosaic grouped-matmul kernel on TPU; attention is
    # splash's (forward, dkv and dq kernels)
    kernels = out.split("Mosaic kernels in the compiled program: ")[1].splitlines()[0]
    assert int(kernels.split()[0]) >= 3 and " 0 ragged_dot" not in kernels
    ratio = float(out.split("(ratio ")[1].split(")")[0])
    # XLA's cost analysis counts jax.lax.ragged_dot as dense over all local experts, so the
    # expert FLOPs appear n_experts / top_k = 4 times; the rest must match the model. A
    # dispatch replicated on every data-parallel chip (the bug shard_map prevents) gave 11.5.
    assert 1.0 < ratio < 4.0


@needs_libtpu
@pytest.mark.slow
def test_the_megablox_dispatch_compiles_its_pallas_kernels_into_the_tpu_plan():
    # auto is megablox on TPU: forward w1, w3, w2 and their backward (gmm for the rows, tgmm
    # for the weights), under expert=2
    result = moe_aot(
        ROOT / "configs/tiny-moe.yaml",
        "--topology",
        "v5p-8",
        "mesh.data=2",
        "mesh.expert=2",
        "model.vocab_size=512",
        "model.n_layers=1",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kernels = result.stdout.split("Mosaic kernels in the compiled program: ")[1].splitlines()[0]
    assert int(kernels.split()[0]) >= 9 + 3 and kernels.endswith("0 ragged_dot (XLA)") and "FITS" in result.stdout
    # expert parallelism exchanges the copies with the real primitive (emulated only on CPU)
    collectives = result.stdout.split("per chip (each instruction once): ")[1].splitlines()[0]
    assert "ragged-all-to-all" in collectives, collectives


@needs_libtpu
@pytest.mark.slow
def test_a_qlora_plan_compiles_for_one_v5p_chip(tmp_path):
    # one chip (a host of 1x1x1), the frozen base in nf4-dq, LoRA on attention and every expert
    result = moe_aot(
        ROOT / "configs/tiny-moe.yaml",
        "--topology",
        "v5p:1x1x1",
        "mesh.data=1",
        "model.n_layers=1",
        "model.vocab_size=512",
        "train.batch_size=1",
        f"train.init_from={tmp_path}",
        "lora.rank=4",
        "lora.targets=[q,mlp]",
        "quant.base=nf4-dq",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "topology v5p:1x1x1: 1 chips" in out and "FITS" in out
    value, unit = out.split("  params")[1].split()[:2]
    params_bytes = float(value) * {"MiB": 2**20, "GiB": 2**30}[unit]
    full = (
        float(
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "moe",
                    "params",
                    str(ROOT / "configs/tiny-moe.yaml"),
                    "model.n_layers=1",
                    "model.vocab_size=512",
                ],
                capture_output=True,
                text=True,
            )
            .stdout.split("total parameters: ")[1]
            .split()[0]
            .replace(",", "")
        )
        * 4
    )
    assert params_bytes < 0.6 * full  # the layers' weights counted in 4 bits, not float32


@needs_libtpu
@pytest.mark.slow
def test_a_plan_that_does_not_fit_exits_non_zero():
    result = moe_aot(
        ROOT / "configs/tiny-moe.yaml",
        "--topology",
        "v5p-8",
        "mesh.data=4",
        "model.d_model=4096",
        "model.d_ff=32768",
        "model.n_heads=32",
        "model.n_kv_heads=8",
    )
    assert result.returncode == 3, result.stdout + result.stderr
    verdict = result.stdout.splitlines()[-1]
    assert verdict.startswith("DOES NOT FIT: RESOURCE_EXHAUSTED"), verdict
    assert re.search(r"\d+(\.\d+)?G\)? exceeds", verdict), "the bytes asked for are named"


@needs_libtpu
@pytest.mark.slow
def test_a_compiler_failure_that_is_not_memory_is_an_error_not_does_not_fit():
    # the same small plan as above, with the compiler made to fail the way a compiler bug does
    fail = (
        "import sys, jax.stages\n"
        "def broken(self, *a, **k): raise RuntimeError('INTERNAL: an unsupported op in the HLO')\n"
        "jax.stages.Lowered.compile = broken\n"
        "from moe.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            fail,
            "aot",
            str(ROOT / "configs/tiny-moe.yaml"),
            "--topology",
            "v5p-8",
            "mesh.data=4",
            "model.vocab_size=512",
            "model.n_layers=1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "DOES NOT FIT" not in result.stdout + result.stderr
    assert "the TPU compiler failed (RuntimeError): INTERNAL: an unsupported op" in result.stderr


def test_only_resource_exhaustion_means_does_not_fit():
    oom = RuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (248.01G) exceeds available HBM (95.74G)."
    )
    assert aot.out_of_memory(oom).startswith("RESOURCE_EXHAUSTED: Ran out of memory")
    assert aot.out_of_memory(RuntimeError("INTERNAL: Mosaic failed")) is None


def test_roofline_scales_the_one_layer_cost_takes_the_slower_of_compute_and_memory_never_below_model_flops():
    report = aot.AotReport(
        "v5p-8",
        4,
        {},
        95 * 2**30,
        0,
        0,
        0,
        0,
        compiled_flops=2e12,
        model_flops=8e12,
        model_flops_one_layer=1e12,
        compile_seconds=0.0,
        fits=True,
        compiled_bytes=1e11,
        peaks=(400e12, 2e12),
    )
    roof = report.roofline()  # the whole step: 16e12 FLOPs (40 ms) and 8e11 bytes (400 ms)
    assert roof["compute_s"] == pytest.approx(0.04) and roof["memory_s"] == pytest.approx(0.4)
    assert roof["step_s"] == pytest.approx(0.4) and roof["mfu"] == pytest.approx(8e12 / (0.4 * 400e12))
    assert "MFU at most 5.0%" in report.format()
    undercounted = dataclasses.replace(report, compiled_flops=0.5e12, compiled_bytes=1e9)  # below the model's FLOPs
    assert undercounted.roofline()["compute_s"] == pytest.approx(8e12 / 400e12)
    assert undercounted.roofline()["mfu"] == pytest.approx(1.0)
    kernels = aot.tpu_kernels(
        '%splash_mha_fwd = custom-call(), custom_call_target="tpu_custom_call"\n'
        'b custom_call_target="tpu_custom_call" ragged_dot_tiling="128,128,128"\n'
        'c custom_call_target="tpu_custom_call" metadata={op_name="ragged-dot-metadata"}\nd dot'
    )
    assert kernels == {"Pallas (jax)": 1, "ragged_dot (XLA)": 2}


@needs_libtpu
@pytest.mark.slow
def test_a_tpu_plan_gets_no_cpu_compiler_options():
    probe = (
        "import jax, numpy as np\nfrom moe.plan import aot\nfrom moe.training import step as train\n"
        "mesh = jax.sharding.Mesh(np.array(aot.slice_devices('v5p', 'v5p:2x2x1')), ('data',))\n"
        "print('options', train.compiler_options(mesh), train.compiler_options())"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    from moe.training.step import CPU_COMPILER_OPTIONS  # a plan compiled for TPU gets none; this CPU host's step does

    assert f"options None {CPU_COMPILER_OPTIONS}" in result.stdout, result.stderr[-2000:]


@needs_libtpu
@pytest.mark.slow
def test_two_slices_compile_with_data_across_dcn_and_a_mismatch_is_refused():
    base = [
        ROOT / "configs/tiny-moe.yaml",
        "--topology",
        "v5p-8",
        "--slices",
        "2",
        "model.vocab_size=512",
        "model.n_layers=1",
    ]
    result = moe_aot(*base, "mesh.data=2", "mesh.dcn_data=2", "mesh.fsdp=2", "mesh.expert=2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "topology v5p-8 x 2 slices: 8 chips" in result.stdout and "FITS" in result.stdout
    # the data axis is the one that crosses slices: each data index is one whole slice
    layout = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "from moe import config\nfrom moe.parallel import mesh as sharding\nfrom moe.plan import aot\n"
                "cfg = config.load('configs/tiny-moe.yaml', ['mesh.data=2', 'mesh.dcn_data=2', 'mesh.fsdp=4'])\n"
                "mesh = sharding.make_mesh(cfg, aot.slice_devices('v5p', 'v5p:2x2x1', 2))\n"
                "print(sorted({(i, d.slice_index) for i in range(2) for d in mesh.devices[i].flat}))"
            ),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", ALLOW_MULTIPLE_LIBTPU_LOAD="1"),
    )
    assert layout.stdout.strip().splitlines()[-1] == "[(0, 0), (1, 1)]", layout.stdout + layout.stderr
    refused = moe_aot(*base)
    assert refused.returncode == 2 and "set e.g. mesh.dcn_data=2" in refused.stderr
