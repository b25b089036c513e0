"""Which JAX platforms a `moe` command uses, decided before JAX is imported.

With the `tpu` extra installed, JAX loads libtpu on every host, and on a host without TPU
chips libtpu's failed initialization prints pages of errors (metadata server, worker
hostnames, lockfile) before the command's own output. Where this host has no TPU device
and the user set no JAX_PLATFORMS, JAX is told to use the GPU (when its plugin is
installed) or the CPU. `moe aot` still describes TPU topologies: it asks libtpu for them
directly, whatever the platforms.

Where the computation runs on this host's CPU, a `moe` process also re-runs itself once with
glibc's malloc backing its large blocks with transparent huge pages
(GLIBC_TUNABLES=glibc.malloc.hugetlb=1): XLA:CPU allocates a train step's temporaries
(2.1 GiB for bench-moe) afresh every step, and with 4 KiB pages the first touch of each
page is a fault. Set GLIBC_TUNABLES yourself, or MOE_HUGEPAGE_MALLOC=0, to keep the default.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def has_tpu() -> bool:
    """TPU chips show up as /dev/accel* (v2 to v5e) or /dev/vfio/N (v5p, v6e)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or os.environ.get("TPU_ACCELERATOR_TYPE"))


def has_cuda_plugin() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in CUDA_PLUGINS)


def quiet_without_tpu(environ=os.environ) -> str | None:
    """Set JAX_PLATFORMS when libtpu is installed but no TPU is here; returns what was set."""
    if environ.get("JAX_PLATFORMS") or has_tpu() or importlib.util.find_spec("libtpu") is None:
        return None
    environ["JAX_PLATFORMS"] = "cuda,cpu" if has_cuda_plugin() else "cpu"
    return environ["JAX_PLATFORMS"]


HUGEPAGE_MALLOC = "glibc.malloc.hugetlb=1"  # glibc >= 2.35: madvise(MADV_HUGEPAGE) on malloc's mmapped blocks


def computes_on_cpu(environ=os.environ) -> bool:
    """JAX's first platform here is the CPU: JAX_PLATFORMS says so, or, unset, there is
    neither a TPU nor a CUDA plugin."""
    if environ.get("JAX_PLATFORMS"):
        return environ["JAX_PLATFORMS"].split(",")[0].strip() == "cpu"
    return not has_tpu() and not has_cuda_plugin()


def hugepage_malloc_env(environ=os.environ, libc: str | None = None) -> dict | None:
    """The environment to re-run this process in with HUGEPAGE_MALLOC, or None where it does
    not apply: the user set GLIBC_TUNABLES (or MOE_HUGEPAGE_MALLOC=0), the C library is not
    glibc 2.35 or newer, or JAX computes on an accelerator. libc: "glibc 2.36" as
    os.confstr names it (read here when None)."""
    if "GLIBC_TUNABLES" in environ or environ.get("MOE_HUGEPAGE_MALLOC", "1") == "0":
        return None
    if libc is None:
        try:
            libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
        except (ValueError, OSError, AttributeError):  # not a glibc system
            libc = ""
    name, _, version = libc.partition(" ")
    numbers = tuple(int(n) for n in version.split(".")[:2] if n.isdigit())
    if name != "glibc" or numbers < (2, 35) or not computes_on_cpu(environ):
        return None
    return {**environ, "GLIBC_TUNABLES": HUGEPAGE_MALLOC}


def rerun_with_hugepage_malloc() -> None:
    """Where hugepage_malloc_env applies, replace this process (same PID) by the same command
    line under it: glibc reads its tunables only at start. Call before anything heavy loads."""
    env = hugepage_malloc_env()
    if env is not None:
        os.execve(sys.executable, sys.orig_argv, env)
