"""Sharding policy: the device mesh from config, and the logical-axis rules presets.

The model names only logical axes (moe/model); the presets below map them to the mesh axes
    data    pure data parallelism (gradients all-reduced)
    fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3)
    context the sequence split into contiguous shards (context parallelism; its devices
            also shard the parameters, as fsdp's do); attention across the shards is
            moe/parallel/context.py
    expert  expert parallelism: each device holds n_experts / expert experts
    tensor  tensor parallelism over heads, MLP width and vocabulary
Changing the layout is a config change: `mesh.fsdp=4 mesh.expert=2 mesh.rules=default`.
Nothing here knows the model or training: the shardings of parameters and of the train
state are derived from these rules in moe/training/state.py.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moe.config import Config, ConfigError, MeshConfig

AXES = ("data", "fsdp", "context", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the batch is split over these (expert too, outside the MoE block)
CONTEXT_AXIS = "context"  # the sequence is split over this one
EXPERT_AXIS, TENSOR_AXIS = "expert", "tensor"

RULES = {
    # FSDP over the embedding dimension, experts over `expert`, heads / MLP / vocab over `tensor`.
    "default": (
        ("activation_batch", BATCH_AXES),
        ("activation_length", CONTEXT_AXIS),
        ("activation_embed", None),
        ("vocab", "tensor"),
        ("embed", ("fsdp", CONTEXT_AXIS)),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("exp", "expert"),
        ("layers", None),
        ("norm", None),
        ("lora", None),
    ),
    # Every parameter replicated; only the batch (and the sequence) is split.
    "replicated": (
        ("activation_batch", BATCH_AXES),
        ("activation_length", CONTEXT_AXIS),
        ("activation_embed", None),
        ("vocab", None),
        ("embed", None),
        ("mlp", None),
        ("heads", None),
        ("kv_heads", None),
        ("head_dim", None),
        ("exp", None),
        ("layers", None),
        ("norm", None),
        ("lora", None),
    ),
}


def mesh_shape(mesh_cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Axis sizes with -1 filled from the device count; refuses what does not multiply out."""
    sizes = {axis: getattr(mesh_cfg, axis) for axis in AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"at most one mesh axis may be -1 (fill), got {fill}")
    if any(s < 1 for a, s in sizes.items() if a not in fill):
        raise ConfigError(f"mesh axis sizes must be >= 1 or -1, got {sizes}")
    known = math.prod(s for a, s in sizes.items() if a not in fill)
    if fill:
        if n_devices % known:
            raise ConfigError(f"mesh {sizes}: {n_devices} devices are not divisible by {known}")
        sizes[fill[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ConfigError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices but {n_devices} are present; "
            "set one axis to -1 to fill"
        )
    return sizes


def check_divisibility(cfg: Config, sizes: dict[str, int]) -> None:
    """Refuse layouts that do not divide, before anything compiles."""
    m, t = cfg.model, cfg.train
    batch_ways = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro = t.batch_size // t.grad_accum
    if micro % batch_ways:
        raise ConfigError(
            f"the micro-batch ({micro} sequences = train.batch_size / train.grad_accum) must divide "
            f"over data x fsdp x expert = {batch_ways} devices; change train.batch_size or the mesh"
        )
    if sizes["expert"] > 1 and (not m.is_moe or m.n_experts % sizes["expert"]):
        raise ConfigError(f"model.n_experts ({m.n_experts}) must be divisible by mesh.expert ({sizes['expert']})")
    tp = sizes["tensor"]
    for name, value in [
        ("n_heads", m.n_heads),
        ("n_kv_heads", m.n_kv_heads),
        ("d_ff", m.d_ff),
        ("vocab_size", m.vocab_size),
    ]:
        if tp > 1 and value % tp:
            raise ConfigError(f"model.{name} ({value}) must be divisible by mesh.tensor ({tp})")
    shards = sizes["fsdp"] * sizes[CONTEXT_AXIS]  # the parameters' d_model is split over both
    if shards > 1 and m.d_model % shards:
        raise ConfigError(
            f"model.d_model ({m.d_model}) must be divisible by mesh.fsdp x mesh.context ({shards}), "
            "over which the parameters are sharded"
        )
    context = sizes[CONTEXT_AXIS]
    if context > 1 and t.seq_len % context:
        raise ConfigError(
            f"train.seq_len ({t.seq_len}) must be divisible by mesh.context ({context}): each device "
            f"holds a contiguous shard of every sequence; use a seq_len that is a multiple of {context}"
        )


def make_mesh(cfg: Config, devices=None) -> Mesh:
    """The device mesh for cfg.mesh over all devices of all processes (hybrid ICI x DCN
    for multislice when any mesh.dcn_* size is above 1)."""
    return Mesh(device_grid(cfg, list(jax.devices() if devices is None else devices)), AXES)


def device_grid(cfg: Config, devices: list) -> np.ndarray:
    """Devices arranged [data, fsdp, context, expert, tensor]; with DCN sizes, each axis's outer
    dcn_* blocks are whole slices (devices' slice_index), so only they talk over DCN."""
    sizes = mesh_shape(cfg.mesh, len(devices))
    check_divisibility(cfg, sizes)
    dcn = {axis: getattr(cfg.mesh, f"dcn_{axis}") for axis in AXES}
    if math.prod(dcn.values()) == 1:
        return np.asarray(devices).reshape(tuple(sizes[a] for a in AXES))

    if any(sizes[a] % dcn[a] for a in AXES):
        raise ConfigError(f"mesh sizes {sizes} must be divisible by the DCN sizes {dcn}")
    ici = tuple(sizes[a] // dcn[a] for a in AXES)
    # within a slice any factorization of the chips (as the single-slice reshape allows),
    # even one that splits a physical torus axis
    return mesh_utils.create_hybrid_device_mesh(
        ici, tuple(dcn[a] for a in AXES), devices, allow_split_physical_axes=True
    )


def rules(cfg: Config):
    return RULES[cfg.mesh.rules]


def active_mesh():
    """The mesh set with jax.set_mesh, or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def splits_evenly(mesh, rows: int, seq: int = 1) -> bool:
    """Whether [rows, seq] arrays divide over `mesh`: rows over the batch axes, the
    sequence over `context`."""
    shape = dict(mesh.shape)
    shards = math.prod(size for axis, size in shape.items() if axis in BATCH_AXES)
    return rows % shards == 0 and seq % shape.get(CONTEXT_AXIS, 1) == 0


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """A batch array [rows, seq]: rows over the batch axes, the sequence over `context`."""
    return NamedSharding(mesh, P(BATCH_AXES, CONTEXT_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def initialize_distributed(cfg: Config) -> None:
    """Join the multi-host runtime when more than one process is configured (config first,
    then MOE_* environment variables). MOE_DISTRIBUTED=auto (set by launch/tpu_vm.sh and
    launch/xpk.sh) lets jax find the settings of a TPU slice or GKE job itself."""
    d = cfg.distributed
    address = d.coordinator_address or os.environ.get("MOE_COORDINATOR_ADDRESS")
    count = d.num_processes or int(os.environ.get("MOE_NUM_PROCESSES", "0") or 0)
    pid = d.process_id if d.process_id is not None else os.environ.get("MOE_PROCESS_ID")
    if os.environ.get("MOE_DISTRIBUTED", "auto") != "auto":
        raise ConfigError(
            f"MOE_DISTRIBUTED={os.environ['MOE_DISTRIBUTED']!r}: the only value is 'auto' (or leave it unset)"
        )
    if jax.distributed.is_initialized():
        return
    if address and count > 1:
        if pid is None:
            raise ConfigError("multi-host: set distributed.process_id or MOE_PROCESS_ID for each process")
        if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=int(pid))
    elif (
        os.environ.get("MOE_DISTRIBUTED") == "auto"
        or os.environ.get("TPU_WORKER_HOSTNAMES")
        or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")
    ):
        jax.distributed.initialize()  # TPU pod, multislice or GKE: jax reads the settings itself


def wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
    """Block until every process of a multi-host run reaches the barrier `name` (unique per
    run). The coordination service's barrier, not a device collective: on CPU hosts gloo
    sets up a collective's connections on its first run and gives up after 30 s, so processes
    that finish compiling far apart (a loaded host) must meet here first. No-op alone."""
    from orbax.checkpoint import multihost  # here, not at the top: the model imports this module, not Orbax

    multihost.get_barrier_sync_fn()(key=f"moe.{name}", timeout_ms=timeout_s * 1000)
