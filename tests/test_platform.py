"""moe/platform.py's huge-page malloc choice: which hosts re-run with it, and who can opt out
(that `moe train` really re-runs with it is test_loop's SIGKILL test; that `moe bench` does
not, test_cli's bench test)."""

import importlib.util
import os

import pytest

from moe import platform

from helpers import ROOT


def test_huge_page_malloc_only_on_cpu_hosts_with_a_new_glibc_and_no_user_choice(monkeypatch):
    monkeypatch.setattr(platform, "has_tpu", lambda: False)
    cpu = {"JAX_PLATFORMS": "cpu", "HOME": "/h"}
    assert platform.hugepage_malloc_env(cpu, libc="glibc 2.36") == {**cpu, "GLIBC_TUNABLES": platform.HUGEPAGE_MALLOC}
    assert platform.hugepage_malloc_env(cpu, libc="glibc 2.35") is not None
    assert platform.hugepage_malloc_env(cpu, libc="glibc 2.31") is None  # no such tunable before 2.35
    assert platform.hugepage_malloc_env(cpu, libc="") is None  # musl, or not Linux
    for accelerator in ("tpu", "cuda,cpu", "tpu,cpu"):
        assert platform.hugepage_malloc_env({"JAX_PLATFORMS": accelerator}, libc="glibc 2.36") is None
    # the user's own tunables, the opt-out, and the re-run itself (no second re-run)
    for env in (
        {**cpu, "GLIBC_TUNABLES": "glibc.malloc.arena_max=1"},
        {**cpu, "MOE_HUGEPAGE_MALLOC": "0"},
        {**cpu, "GLIBC_TUNABLES": platform.HUGEPAGE_MALLOC},
    ):
        assert platform.hugepage_malloc_env(env, libc="glibc 2.36") is None
    assert platform.computes_on_cpu({}) == (not any(importlib.util.find_spec(n) for n in platform.CUDA_PLUGINS))
    monkeypatch.setattr(platform, "has_tpu", lambda: True)
    assert platform.hugepage_malloc_env({}, libc="glibc 2.36") is None  # a TPU VM with JAX_PLATFORMS unset


@pytest.mark.parametrize("first", ["", "import flax, jax; "], ids=["moe-first", "jax-first"])
def test_importing_the_package_keeps_libtpu_quiet_without_tpus(first):
    """A program that imports moe and runs a model (not the `moe` command) prints no libtpu
    initialization errors on a host without TPUs, the tpu extra installed or not."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_ACCELERATOR_TYPE")}
    code = first + "import moe.model, jax; print(jax.devices()[0].platform)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cpu"
    noise = [
        line
        for line in result.stderr.splitlines()
        if any(word in line for word in ("libtpu", "TPU_", "InitGoogle", "tpu_"))
    ]
    assert noise == []


@pytest.mark.slow
def test_the_long_prefill_benchmark_prints_no_libtpu_line():
    """The program from the report: it imports JAX before moe and runs a model."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_ACCELERATOR_TYPE", "XLA_FLAGS")}
    command = [sys.executable, "benchmarks/long_prefill.py", "--tokens", "1024", "--new", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if any(w in line for w in ("libtpu", "TPU_", "InitGoogle"))]
