"""Which JAX platforms a `moe` command uses, decided before JAX is imported.

With the `tpu` extra installed, JAX loads libtpu on every host, and on a host without TPU
chips libtpu's failed initialization prints pages of errors (metadata server, worker
hostnames, lockfile) before the command's own output. Where this host has no TPU device
and the user set no JAX_PLATFORMS, JAX is told to use the GPU (when its plugin is
installed) or the CPU. `moe aot` still describes TPU topologies: it asks libtpu for them
directly, whatever the platforms.
"""

from __future__ import annotations

import glob
import importlib.util
import os

CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def has_tpu() -> bool:
    """TPU chips show up as /dev/accel* (v2 to v5e) or /dev/vfio/N (v5p, v6e)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or os.environ.get("TPU_ACCELERATOR_TYPE"))


def quiet_without_tpu(environ=os.environ) -> str | None:
    """Set JAX_PLATFORMS when libtpu is installed but no TPU is here; returns what was set."""
    if environ.get("JAX_PLATFORMS") or has_tpu() or importlib.util.find_spec("libtpu") is None:
        return None
    gpu = any(importlib.util.find_spec(name) is not None for name in CUDA_PLUGINS)
    environ["JAX_PLATFORMS"] = "cuda,cpu" if gpu else "cpu"
    return environ["JAX_PLATFORMS"]
