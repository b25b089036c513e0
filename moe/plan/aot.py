"""`moe aot`: compile the full train step for a TPU topology on this (CPU) host.

Needs libtpu (`pip install -e ".[tpu]"`), which can describe TPU topologies it does not
have. The step is lowered with the run's real shardings over a mesh of the topology's
chips and compiled by the TPU compiler; the report gives per-chip bytes for parameters,
optimizer state and temporaries against the chip's HBM, and the compiled FLOPs per step
beside the model-FLOPs estimate. A plan that does not fit (the compiler's
RESOURCE_EXHAUSTED) exits 3 with the bytes the compiler asked for; any other compiler
failure is an error (exit 1), never reported as "does not fit".
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import numpy as np

from moe.config import Config, ConfigError
from moe.model import attention as attention_lib
from moe.model import dispatch as dispatch_lib
from moe.model.params import count_params
from moe.parallel import mesh as mesh_lib
from moe.quant import params as qparams
from moe.training import state as state_lib
from moe.training import step as train_lib
from moe.training.trainable import split

# chips per slice = cores / CORES_PER_CHIP; HBM bytes per chip
CHIPS = {"v4": (2, 32 * 2**30), "v5p": (2, 95 * 2**30), "v5e": (1, 16 * 2**30), "v6e": (1, 32 * 2**30)}
# per chip, Google's published figures: peak bfloat16 FLOP/s, HBM bytes/s (the roofline)
PEAKS = {"v4": (275e12, 1228e9), "v5p": (459e12, 2765e9), "v5e": (197e12, 819e9), "v6e": (918e12, 1640e9)}
TOPOLOGY_NAMES = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v6e": "v6e"}


def chip_grid(generation: str, chips: int) -> str:
    """The physical chip grid of a slice, e.g. v5p with 64 chips -> '4x4x4'."""
    if generation in ("v4", "v5p"):  # 3D torus, dimensions as even as powers of two allow
        dims = [1, 1, 1]
        for i in range(int(math.log2(chips))):
            dims[i % 3] *= 2
        if math.prod(dims) != chips:
            raise ConfigError(f"{generation} slices have a power-of-two chip count, got {chips}")
        # a slice smaller than a cube keeps the host's 2x2x1 chips in front
        return "x".join(map(str, sorted(dims, reverse=chips < 8) if chips < 8 else sorted(dims)))
    side = 2 ** (int(math.log2(chips)) // 2)
    if side * (chips // side) != chips:
        raise ConfigError(f"{generation} slices have a power-of-two chip count, got {chips}")
    return f"{side}x{chips // side}"


def parse_topology(name: str) -> tuple[str, str, int]:
    """'v5p-128' (TensorCores, as Cloud TPU names slices) or 'v5p:4x4x4' ->
    (generation, topology name for libtpu, chips)."""
    match = re.fullmatch(r"(v4|v5p|v5e|v6e)[-:](\S+)", name)
    if not match:
        raise ConfigError(f"unknown topology {name!r}; write e.g. v5p-128, v5e-16, v4-32 or v5p:2x2x2")
    generation, size = match.groups()
    if "x" in size:
        grid = size
    else:
        cores = int(size)
        grid = chip_grid(generation, max(1, cores // CHIPS[generation][0]))
    chips = math.prod(int(d) for d in grid.split("x"))
    return generation, f"{TOPOLOGY_NAMES[generation]}:{grid}", chips


def _host_bounds(generation: str, name: str) -> dict:
    """A v4 / v5p slice smaller than one host's 2x2x1 chips (e.g. one chip, v5p:1x1x1) is
    described as a host of just those chips; libtpu takes the default otherwise."""
    dims = tuple(int(d) for d in name.split(":")[1].split("x"))
    if generation in ("v4", "v5p") and math.prod(dims) < 4:
        return {"chips_per_host_bounds": dims}
    return {}


def _per_chip_bytes(abstract_tree, shardings) -> int:
    total = 0
    for leaf, sharding in zip(jax.tree_util.tree_leaves(abstract_tree), jax.tree_util.tree_leaves(shardings)):
        total += math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


class CompileError(RuntimeError):
    """The TPU compiler failed for a reason other than memory: a bug to report, not a plan that is too big."""


def out_of_memory(error: Exception) -> str | None:
    """The compiler's out-of-memory message (it names the bytes asked for and the HBM there
    is), or None when `error` is any other failure."""
    lines = [line.strip() for line in str(error).splitlines() if "RESOURCE_EXHAUSTED" in line]
    return lines[0][:500] if lines else None


@dataclasses.dataclass
class AotReport:
    topology: str
    chips: int
    mesh: dict
    hbm_per_chip: int
    params_bytes: int
    opt_state_bytes: int
    temp_bytes: int | None
    total_bytes: int | None
    compiled_flops: float | None
    model_flops: float
    model_flops_one_layer: float  # what XLA's cost analysis sees: the scanned layer body once
    compile_seconds: float
    fits: bool
    error: str | None = None
    kernels: dict = dataclasses.field(default_factory=dict)  # tpu_kernels(): Mosaic kernel calls by origin
    compiled_bytes: float | None = None  # XLA's "bytes accessed" (the scanned layer body once, as FLOPs)
    peaks: tuple[float, float] | None = None  # the chip's (FLOP/s, HBM bytes/s)
    collectives: dict = dataclasses.field(default_factory=dict)  # collective_counts(): instructions by kind
    collective_kinds_bytes: dict | None = None  # collective_bytes_by_kind(): what the collectives produce

    @property
    def collective_bytes(self) -> int | None:
        return None if self.collective_kinds_bytes is None else sum(self.collective_kinds_bytes.values())

    def to_dict(self) -> dict:
        """The report for scripts (`moe aot --json`, `moe plan`): per-chip bytes by kind,
        fits, compiled FLOPs and bytes, the roofline and the kernels."""
        return {
            "topology": self.topology,
            "chips": self.chips,
            "mesh": self.mesh,
            "hbm_bytes": self.hbm_per_chip,
            "params_bytes": self.params_bytes,
            "opt_state_bytes": self.opt_state_bytes,
            "temp_bytes": self.temp_bytes,
            "total_bytes": self.total_bytes,
            "fits": self.fits,
            "error": self.error,
            "flops": self.compiled_flops,
            "bytes_accessed": self.compiled_bytes,
            "model_flops": self.model_flops,
            "model_flops_one_layer": self.model_flops_one_layer,
            "collective_bytes": self.collective_bytes,
            "collectives": self.collectives,
            "collective_bytes_by_kind": self.collective_kinds_bytes,
            "roofline": self.roofline(),
            "kernels": self.kernels,
            "compile_seconds": self.compile_seconds,
        }

    def roofline(self) -> dict | None:
        """A lower bound on the step time from the compiled cost: the compiled FLOPs and
        bytes, scaled from the one-layer count XLA reports to the whole step by the model's
        own whole/one-layer FLOP ratio, against the chip's peak FLOP/s and HBM bandwidth;
        and the MFU that step time would give (an upper bound).

        The FLOPs are at least the model's own: XLA also counts once the body of loops it
        makes itself (collective matmuls over larger meshes split into per-shard steps), so
        the compiled count can fall below the work the step must do (seen: 0.65 of the
        model's FLOPs for mistral-7b on v5p-32, 1.07 on v5p-8 for the same layers)."""
        if not (self.compiled_flops and self.compiled_bytes and self.peaks):
            return None
        scale = self.model_flops / self.model_flops_one_layer
        compute_s = max(self.compiled_flops * scale, self.model_flops) / self.peaks[0]
        memory_s = self.compiled_bytes * scale / self.peaks[1]
        step_s = max(compute_s, memory_s)
        return {
            "compute_s": compute_s,
            "memory_s": memory_s,
            "step_s": step_s,
            "mfu": self.model_flops / (step_s * self.peaks[0]),
        }

    def format(self) -> str:
        gib = lambda b: "?" if b is None else f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"
        lines = [
            f"topology {self.topology}: {self.chips} chips, {gib(self.hbm_per_chip)} HBM each",
            f"mesh {self.mesh}",
            "per chip:",
            f"  params           {gib(self.params_bytes)}",
            f"  optimizer state  {gib(self.opt_state_bytes)}",
            f"  temporaries      {gib(self.temp_bytes)}",
            f"  total            {gib(self.total_bytes)} of {gib(self.hbm_per_chip)}",
        ]
        if self.compiled_flops is not None:
            lines.append(
                f"FLOPs per step per chip: model estimate {self.model_flops:.4g}; XLA's cost analysis "
                f"counts the scanned layer body once: compiled {self.compiled_flops:.4g} vs model "
                f"estimate with one layer {self.model_flops_one_layer:.4g} "
                f"(ratio {self.compiled_flops / self.model_flops_one_layer:.2f})"
            )
        roof = self.roofline()
        if roof:
            lines.append(
                f"roofline step time {roof['step_s']:.3g} s per step (compute {roof['compute_s']:.3g} s at "
                f"{self.peaks[0] / 1e12:.0f} TFLOP/s, HBM {roof['memory_s']:.3g} s at "
                f"{self.peaks[1] / 1e9:.0f} GB/s): MFU at most {roof['mfu']:.1%}"
            )
        if self.collective_bytes is not None:
            kinds = ", ".join(
                f"{n} {kind}"
                + (f" ({gib(self.collective_kinds_bytes[kind])})" if kind in self.collective_kinds_bytes else "")
                for kind, n in self.collectives.items()
            )
            lines.append(
                f"collectives produce {gib(self.collective_bytes)} per chip (each instruction once)"
                + (f": {kinds}" if kinds else "")
            )
        if self.kernels:
            lines.append(
                "Mosaic kernels in the compiled program: " + ", ".join(f"{v} {k}" for k, v in self.kernels.items())
            )
        lines.append(f"compiled in {self.compile_seconds:.1f} s on this host")
        lines.append("FITS" if self.fits else f"DOES NOT FIT: {self.error or 'over HBM'}")
        return "\n".join(lines)


def tpu_kernels(hlo_text: str) -> dict[str, int]:
    """Calls of Mosaic kernels in a compiled TPU program: those XLA itself emits for
    jax.lax.ragged_dot (the grouped matmul and its metadata), and jax's Pallas kernels
    (megablox, splash attention): every other Mosaic call."""
    calls = [line for line in hlo_text.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    xla = sum("ragged_dot_tiling" in c or "ragged-dot-metadata" in c for c in calls)
    return {"Pallas (jax)": len(calls) - xla, "ragged_dot (XLA)": xla}


DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}
_COLLECTIVE = re.compile(
    r"= (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all|ragged-all-to-all|"
    r"collective-permute)(-start)?\("
)


def collective_bytes_by_kind(hlo_text: str) -> dict[str, int]:
    """Bytes per chip that the collectives of a compiled program produce, by kind, each
    instruction counted once (a loop body once, as XLA's cost analysis does: in a scan
    over the layers, one layer's); an async start counts its largest buffer (its tuple
    also holds the operand)."""
    totals: dict[str, int] = {}
    for match in _COLLECTIVE.finditer(hlo_text):
        sizes = [
            DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
            for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", match.group(1))
        ]
        size = (max(sizes) if match.group(3) else sum(sizes)) if sizes else 0
        totals[match.group(2)] = totals.get(match.group(2), 0) + size
    return dict(sorted(totals.items()))


def collective_bytes(hlo_text: str) -> int:
    """collective_bytes_by_kind's total."""
    return sum(collective_bytes_by_kind(hlo_text).values())


def collective_counts(hlo_text: str) -> dict[str, int]:
    """Collective instructions of a compiled program by kind (e.g. {"ragged-all-to-all": 4})."""
    counts: dict[str, int] = {}
    for match in _COLLECTIVE.finditer(hlo_text):
        counts[match.group(2)] = counts.get(match.group(2), 0) + 1
    return dict(sorted(counts.items()))


def _frozen(cfg: Config, mesh):
    """(the frozen params as sharded ShapeDtypeStructs, their shardings); {} when all train."""
    full = jax.eval_shape(lambda: train_lib.fresh_params(cfg, jax.random.key(0)))
    frozen = split(cfg, full)[1]
    shardings = state_lib.like_params(cfg, mesh, frozen)
    if cfg.quant.base is not None and frozen:  # QLoRA: the base held quantized
        q = cfg.quant
        frozen = qparams.abstract(frozen, q.base, q.include, q.exclude, q.block_size)
        shardings = jax.tree_util.tree_map(
            lambda leaf, s: qparams.leaf_shardings(leaf, s) if isinstance(leaf, qparams.QArray) else s,
            frozen,
            shardings,
            is_leaf=lambda x: isinstance(x, qparams.QArray),
        )
    return state_lib.with_shardings(frozen, shardings), shardings


def slice_devices(generation: str, name: str, slices: int = 1) -> list:
    """The devices of `slices` slices of a topology (multislice: each device's slice_index
    tells the mesh which axes cross DCN)."""
    from jax.experimental import topologies  # needs libtpu (the tpu extra)

    extra = {"num_slices": slices} if slices > 1 else {}
    return topologies.get_topology_desc(
        platform="tpu", topology_name=name, **_host_bounds(generation, name), **extra
    ).devices


def check_slices(cfg: Config, slices: int) -> None:
    dcn = math.prod(getattr(cfg.mesh, f"dcn_{axis}") for axis in mesh_lib.AXES)
    if slices < 1 or dcn != slices:
        raise ConfigError(
            f"{slices} slice(s) but the mesh's DCN sizes (mesh.dcn_data, dcn_fsdp, dcn_expert, "
            f"dcn_tensor) multiply to {dcn}; set e.g. mesh.dcn_data={slices}"
        )


def compile_for_topology(cfg: Config, topology: str, slices: int = 1) -> AotReport:
    """The report of cfg's train step compiled for `slices` slices of the topology."""
    generation, name, chips = parse_topology(topology)
    check_slices(cfg, slices)
    chips *= slices
    if slices > 1:
        topology = f"{topology} x {slices} slices"
    # "auto" choices for TPU, not for this CPU host
    dispatch = dispatch_lib.resolve(cfg.model.moe_dispatch, quantized=cfg.quant.base is not None, backend="tpu")
    attention = attention_lib.resolve(cfg.model.attention, backend="tpu")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe_dispatch=dispatch, attention=attention))
    mesh = mesh_lib.make_mesh(cfg, slice_devices(generation, name, slices))
    abstract, shardings = state_lib.abstract_state(cfg, mesh)
    batch_shape = (cfg.train.batch_size, cfg.train.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(batch_shape, np.int32, sharding=mesh_lib.batch_sharding(mesh))
        for k in ("inputs", "targets", "segment_ids", "positions")
    }
    hbm = CHIPS[generation][1]
    tokens = cfg.train.batch_size * cfg.train.seq_len
    one_layer = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=1))
    model_flops, model_flops_one = (
        train_lib.flops_per_token(c, count_params(c.model).active) * tokens / chips for c in (cfg, one_layer)
    )
    frozen, frozen_shardings = _frozen(cfg, mesh)  # a LoRA base or DPO's reference: no gradients, no state
    params_bytes = _per_chip_bytes(abstract.params, shardings.params) + _per_chip_bytes(frozen, frozen_shardings)
    report = AotReport(
        topology,
        chips,
        dict(mesh.shape),
        hbm,
        params_bytes,
        _per_chip_bytes(abstract.opt_state, shardings.opt_state),
        None,
        None,
        None,
        model_flops,
        model_flops_one,
        0.0,
        False,
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        optimizer = train_lib.make_optimizer(cfg, abstract.params)
        step, _ = train_lib.jit_steps(cfg, optimizer, mesh, shardings, frozen_shardings)
        lowered = step.lower(abstract, batch, frozen)
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - the TPU compiler reports over-HBM plans this way
            report.error = out_of_memory(e)
            if report.error is None:
                raise CompileError(f"the TPU compiler failed ({type(e).__name__}): {str(e).strip()[:2000]}") from e
            report.compile_seconds = time.perf_counter() - start
            return report
    report.compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    report.temp_bytes = int(memory.temp_size_in_bytes)
    report.total_bytes = int(
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report.compiled_flops = float(cost.get("flops", 0.0)) if cost else None
    report.compiled_bytes = float(cost.get("bytes accessed", 0.0)) if cost else None
    report.peaks = PEAKS[generation]
    report.fits = report.total_bytes <= hbm
    text = compiled.as_text()
    report.kernels = tpu_kernels(text)
    report.collective_kinds_bytes = collective_bytes_by_kind(text)
    report.collectives = collective_counts(text)
    return report
