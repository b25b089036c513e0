"""`moe plan`: every mesh that divides a config and a TPU topology, compiled ahead of time
in parallel processes (`moe aot --out`) and ranked.

    moe plan configs/mixtral-8x7b.yaml --topology v5p-128 --jobs 2 train.batch_size=128 train.seq_len=4096

A mesh is a candidate when its axes multiply to the topology's chips and the model divides
over them (moe/parallel/mesh.py check_divisibility: batch over data x fsdp x expert, the
sequence over context, experts over expert, heads / kv heads / d_ff / vocab over tensor,
d_model over fsdp x context). Candidates are
pruned before compiling when tensor parallelism would leave a host (more than its 4
chips) or when parameters and optimizer state alone exceed the chip's HBM (computed from
the shardings, without compiling). Compiled reports are cached by the resolved config,
topology, jax / libtpu versions and this package's source, so a second plan of the same
question with the same code compiles nothing. With --slices N (multislice), every mesh of
N x the topology's chips is tried with each split of N over DCN between data and fsdp.
--fix AXIS=N (e.g. --fix tensor=1) holds an axis, to ask a narrower question of a large
topology (each 8x7B compile takes minutes on a CPU host). Ranked: plans that fit first, then
by roofline step time, then by bytes per chip.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib.metadata
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from moe import config as config_lib
from moe.config import Config, ConfigError
from moe.parallel import mesh as mesh_lib
from moe.plan import aot
from moe.training import state as state_lib

AXES = mesh_lib.AXES  # data, fsdp, context, expert, tensor
CHIPS_PER_HOST = 4  # v4, v5p, v5e and v6e hosts hold 4 chips (8 for some v5e / v6e hosts)


def with_mesh(cfg: Config, mesh: dict) -> Config:
    return dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **mesh))


def mesh_overrides(mesh: dict) -> list[str]:
    return [f"mesh.{axis}={mesh[axis]}" for axis in AXES] + [
        f"mesh.{k}={v}" for k, v in mesh.items() if k.startswith("dcn_")
    ]


def dcn_splits(mesh: dict, slices: int) -> list[dict]:
    """How `slices` slices can split a mesh over DCN: (dcn_data, dcn_fsdp) with product
    `slices`, each dividing its axis. Only data and fsdp cross slices (their collectives, a
    gradient all-reduce or a weight all-gather per layer, tolerate DCN's bandwidth; expert
    all-to-alls and tensor all-reduces would not)."""
    if slices == 1:
        return [{}]
    return [
        {"dcn_data": d, "dcn_fsdp": slices // d}
        for d in range(1, slices + 1)
        if slices % d == 0 and mesh["data"] % d == 0 and mesh["fsdp"] % (slices // d) == 0
    ]


def describe(mesh: dict) -> str:
    text = ", ".join(str(mesh[a]) for a in AXES)
    dcn = [f"{k[4:]} {v}" for k, v in mesh.items() if k.startswith("dcn_") and v > 1]
    return text + (f" (DCN: {', '.join(dcn)})" if dcn else "")


def factorizations(chips: int) -> list[dict]:
    """Every (data, fsdp, context, expert, tensor) whose product is `chips`."""
    divisors = [d for d in range(1, chips + 1) if chips % d == 0]
    meshes = []
    for data, fsdp, context, expert in itertools.product(divisors, repeat=4):
        tensor, left = divmod(chips, data * fsdp * context * expert)
        if not left:
            meshes.append(dict(zip(AXES, (data, fsdp, context, expert, tensor))))
    return meshes


def parse_fixed(items: list[str]) -> dict[str, int]:
    """--fix AXIS=N items (e.g. tensor=1) as {axis: size}; anything else is a ConfigError."""
    fixed = {}
    for item in items:
        axis, _, size = item.partition("=")
        if axis not in AXES or not size.isdigit() or int(size) < 1:
            raise ConfigError(f"--fix {item!r}: use AXIS=N with AXIS one of {', '.join(AXES)} and N >= 1")
        fixed[axis] = int(size)
    return fixed


def candidates(
    cfg: Config, topology: str, slices: int = 1, fixed: dict | None = None
) -> tuple[list[dict], list[tuple[dict, str]]]:
    """(meshes to compile, [(mesh, why it was left out)]) for cfg on `slices` slices of the
    topology, with the axes in `fixed` held at their sizes."""
    generation, name, chips = aot.parse_topology(topology)
    devices = aot.slice_devices(generation, name, slices)
    keep, pruned = [], []
    meshes = [
        {**mesh, **dcn}
        for mesh in factorizations(chips * slices)
        for dcn in dcn_splits(mesh, slices)
        if all(mesh[a] == n for a, n in (fixed or {}).items())
    ]
    for mesh in meshes:
        try:
            mesh_lib.check_divisibility(cfg, mesh)
        except ConfigError:
            continue  # does not divide: not a plan at all
        if mesh["tensor"] > CHIPS_PER_HOST:
            pruned.append((mesh, f"tensor parallelism over {mesh['tensor']} chips leaves a host"))
            continue
        state_bytes = state_bytes_per_chip(with_mesh(cfg, mesh), devices)
        if state_bytes > aot.CHIPS[generation][1]:
            pruned.append((mesh, f"params + optimizer state alone need {state_bytes / 2**30:.1f} GiB per chip"))
            continue
        keep.append(mesh)
    return keep, pruned


def state_bytes_per_chip(cfg: Config, devices: list) -> int:
    """Parameter and optimizer-state bytes per chip from the shardings alone."""
    mesh = mesh_lib.make_mesh(cfg, devices)
    abstract, shardings = state_lib.abstract_state(cfg, mesh)
    return aot._per_chip_bytes(abstract.params, shardings.params) + aot._per_chip_bytes(
        abstract.opt_state, shardings.opt_state
    )


@functools.cache
def code_digest() -> str:
    """A digest of this package's source, so a cached report never outlives the code."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(cfg: Config, topology: str) -> str:
    versions = [importlib.metadata.version(p) for p in ("jax", "jaxlib", "libtpu")]
    text = json.dumps([dataclasses.asdict(cfg), topology, versions, code_digest()], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def compile_one(config_path: str, overrides: list[str], topology: str, slices: int, cache_dir: Path, key: str) -> dict:
    """The `moe aot --out` report of one plan, from the cache or a fresh process."""
    cached = cache_dir / f"{key}.json"
    if cached.is_file():
        return {**json.loads(cached.read_text()), "cached": True}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "moe",
                "aot",
                config_path,
                "--topology",
                topology,
                "--slices",
                str(slices),
                "--out",
                str(out),
                *overrides,
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        if run.returncode not in (0, 3) or not out.is_file():
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            return {"fits": False, "error": f"compile failed: {last[:300]}", "failed": True}
        report = json.loads(out.read_text())
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(report, indent=2) + "\n")
    return {**report, "cached": False}


def rank_key(plan: dict):
    roof = plan["report"].get("roofline") or {}
    return (
        not plan["report"].get("fits", False),
        roof.get("step_s", float("inf")),
        plan["report"].get("total_bytes") or float("inf"),
    )


def plan(
    config_path: str,
    overrides: list[str],
    topology: str,
    jobs: int = 2,
    cache_dir: Path | None = None,
    slices: int = 1,
    fixed: dict | None = None,
) -> dict:
    """Every candidate mesh compiled (or read from the cache) and ranked; the batch and
    sequence length are the config's (train.batch_size=, train.seq_len= among `overrides`)."""
    extra = list(overrides)
    cfg = config_lib.load(config_path, extra)
    if slices < 1:
        raise ConfigError(f"--slices must be >= 1, got {slices}")
    chips = aot.parse_topology(topology)[2] * slices
    meshes, pruned = candidates(cfg, topology, slices, fixed)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if not meshes and not pruned and fixed:
        raise ConfigError(f"no mesh of {chips} chips with {fixed} divides this model; relax --fix")
    if not meshes and not pruned:
        raise ConfigError(
            f"no mesh of {chips} chips divides this model with a micro-batch of {micro} sequences of "
            f"{cfg.train.seq_len} tokens; set train.batch_size= to a multiple of {chips} (or of "
            f"{chips // CHIPS_PER_HOST} with tensor parallelism), or train.seq_len= to a multiple of the "
            "chips left to mesh.context"
        )
    if not meshes:
        raise ConfigError(
            f"every mesh of {chips} chips was left out ({pruned[0][1]}, ...); "
            "use a larger topology or a larger train.batch_size="
        )
    cache_dir = cache_dir or Path(os.environ.get("MOE_PLAN_CACHE", Path.home() / ".cache/moe/plans"))
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = [
            (
                mesh,
                pool.submit(
                    compile_one,
                    config_path,
                    extra + mesh_overrides(mesh),
                    topology,
                    slices,
                    cache_dir,
                    cache_key(with_mesh(cfg, mesh), f"{topology} x {slices}"),
                ),
            )
            for mesh in meshes
        ]
        plans = sorted(({"mesh": mesh, "report": future.result()} for mesh, future in futures), key=rank_key)
    best = next((p for p in plans if p["report"].get("fits")), None)
    command = (
        None
        if best is None
        else " ".join(["moe train", config_path, *extra, *mesh_overrides(best["mesh"]), "--run-dir runs/NAME"])
    )
    return {
        "config": config_path,
        "topology": topology,
        "slices": slices,
        "fixed": fixed or {},
        "chips": chips,
        "batch": cfg.train.batch_size,
        "seq": cfg.train.seq_len,
        "plans": plans,
        "pruned": [{"mesh": m, "why": w} for m, w in pruned],
        "best_command": command,
    }


def format_table(result: dict) -> str:
    def gib(b):
        return "-" if b is None else f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"

    where = result["topology"] + (f" x {result['slices']} slices" if result.get("slices", 1) > 1 else "")
    where += "".join(f", {a}={n} fixed" for a, n in result.get("fixed", {}).items())
    lines = [
        f"{result['config']} on {where} ({result['chips']} chips), batch {result['batch']} x "
        f"{result['seq']}: {len(result['plans'])} meshes compiled, {len(result['pruned'])} left out",
        "| rank | data, fsdp, context, expert, tensor | fits | params | opt state | temporaries | total "
        "| compiled / model FLOPs (one layer) | collectives | roofline step s | MFU bound |",
        "|---" * 11 + "|",
    ]
    for rank, p in enumerate(result["plans"], 1):
        r, roof = p["report"], p["report"].get("roofline") or {}
        ratio = f"{r['flops'] / r['model_flops_one_layer']:.2f}" if r.get("flops") else "-"
        fits = "yes" if r.get("fits") else "no"
        step = f"{roof['step_s']:.4g}" if roof else "-"
        mfu = f"{roof['mfu']:.1%}" if roof else "-"
        lines.append(
            f"| {rank} | {describe(p['mesh'])} | {fits} | {gib(r.get('params_bytes'))} "
            f"| {gib(r.get('opt_state_bytes'))} | {gib(r.get('temp_bytes'))} | {gib(r.get('total_bytes'))} "
            f"| {ratio} | {gib(r.get('collective_bytes'))} | {step} | {mfu} |"
        )
    for rank, p in enumerate(result["plans"], 1):
        if not p["report"].get("fits"):
            lines.append(f"rank {rank} does not fit: {p['report'].get('error') or 'over HBM'}")
    for item in result["pruned"]:
        lines.append(f"left out: {describe(item['mesh'])}: {item['why']}")
    lines.append(f"best: {result['best_command']}" if result["best_command"] else "no mesh fits")
    return "\n".join(lines)
