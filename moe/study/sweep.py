"""Ablation sweeps from a YAML spec: `moe sweep SPEC` runs them, `moe report SPEC` tabulates them.

A spec (experiments/*/sweep.yaml) names a base config and the runs to make from it:

    name: aux-coef                        # runs go to runs/sweeps/<name>/<run> unless runs_dir is set
    title: Load-balancing coefficient     # heading of the report
    base: ../../configs/study-moe.yaml    # paths are relative to the spec file
    overrides: [train.steps=400]          # applied to every run (a list, or a mapping)
    variants:                             # named runs with their own overrides (default: one, "base")
      moe: {}
      dense: {model.n_experts: 0, model.d_ff: 512}
    grid:                                 # a cartesian product applied to every variant
      train.aux_loss_coef: [0.0, 0.01]
    seeds: [0, 1]                         # each run once per seed (seed=N); default: the base's seed
    launch:                               # extra arguments for the launch scripts, per launcher
      tpu_vm: [--zone, us-east5-a, --accelerator, v5p-32]

Overrides apply in that order (common, variant, grid, seed), so later ones win. Every run's
config is loaded and validated when the spec is read, so a typo fails before anything runs.
A run is finished when its metrics.jsonl holds the evaluation at its last step; running the
sweep again skips finished runs and resumes interrupted ones from their checkpoints.
"""

from __future__ import annotations

import dataclasses
import itertools
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from moe import config as config_lib
from moe import progress, storage
from moe.config import Config, ConfigError
from moe.training import metrics as metrics_lib

SPEC_KEYS = ("name", "title", "description", "base", "overrides", "variants", "grid", "seeds", "runs_dir", "launch")
LAUNCHERS = ("local", "tpu_vm", "xpk")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # unique in the sweep, safe as a directory name
    variant: str  # the run's name without its seed, for aggregating seeds
    overrides: tuple[str, ...]  # everything on top of the base config, in order
    changes: tuple[str, ...]  # what sets it apart from the other runs: variant, grid point, seed
    run_dir: Path  # an epath.Path: local or gs://
    config: Config

    def finished(self) -> bool:
        """The run's metrics hold the evaluation at its last step."""
        _, val = metrics_lib.read_if_any(self.run_dir)
        return any(r["step"] == self.config.train.steps for r in val)


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    title: str
    description: str
    spec_path: Path
    base: Path
    common: tuple[str, ...]  # the spec's overrides for every run
    runs: tuple[Run, ...]
    launch: dict  # launcher -> tuple of extra arguments


def _as_overrides(value, where: str) -> list[str]:
    """A list of 'a.b=c' strings or a mapping {a.b: c} as override strings."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [
            f"{key}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, v in value.items()
        ]
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return list(value)
    raise ConfigError(f"{where} must be a mapping {{section.key: value}} or a list of 'section.key=value'")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_")


def _grid_points(grid, where: str) -> list[tuple[str, ...]]:
    """[(override, ...)] for every point of the cartesian product, in spec order."""
    if not grid:
        return [()]
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: grid must map section.key to a list of values")
    axes = []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid.{key} must be a non-empty list of values")
        axes.append([_as_overrides({key: v}, where)[0] for v in values])
    return list(itertools.product(*axes))


def _point_name(point: tuple[str, ...]) -> str:
    return "_".join(_slug(f"{o.split('=', 1)[0].split('.')[-1]}-{o.split('=', 1)[1]}") for o in point)


def _read_spec(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"sweep spec not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep spec is a mapping (name, base, variants, grid, seeds, ...)")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; a spec may hold {list(SPEC_KEYS)}")
    for key in ("name", "base"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise ConfigError(f"{path}: '{key}' is required (a string)")
    if _slug(spec["name"]) != spec["name"]:
        raise ConfigError(f"{path}: name {spec['name']!r} names a folder: use letters, digits, '-', '.', '_'")
    return spec


def _expand(spec: dict, path: Path, base: Path, common: tuple, runs_dir) -> list[Run]:
    variants = spec.get("variants") or {"base": {}}
    if not isinstance(variants, dict):
        raise ConfigError(f"{path}: variants must map a run name to its overrides")
    seeds = spec.get("seeds", [None])  # None: the base config's own seed
    if "seeds" in spec and not (isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds)):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers")
    runs, seen = [], set()
    for variant, variant_overrides in variants.items():
        own = _as_overrides(variant_overrides, f"{path}: variants.{variant}")
        for point in _grid_points(spec.get("grid"), str(path)):
            parts = [_slug(str(variant))] if len(variants) > 1 or not point else []
            name = "_".join(parts + ([_point_name(point)] if point else []))
            for seed in seeds:
                run_name = f"{name}_seed-{seed}" if len(seeds) > 1 else name
                if run_name in seen:
                    raise ConfigError(f"{path}: two runs are both named {run_name!r}; rename a variant")
                seen.add(run_name)
                overrides = (*common, *own, *point, *([f"seed={seed}"] if seed is not None else []))
                try:
                    cfg = config_lib.load(base, overrides)
                except ConfigError as e:
                    raise ConfigError(f"{path}: run {run_name!r}: {e}") from None
                changes = (*own, *point, *([f"seed={seed}"] if len(seeds) > 1 else []))
                runs.append(Run(run_name, name, overrides, changes, runs_dir / run_name, cfg))
    return runs


def load(path: str | Path, runs_dir: str | Path | None = None) -> Sweep:
    """Read and expand a sweep spec (a file, or a shipped spec by name: `aux-coef` is
    experiments/aux-coef/sweep.yaml of the package); every run's config is validated here."""
    path = Path(path)
    shipped = config_lib.shipped("experiments") / str(path) / "sweep.yaml"
    if not path.exists() and len(path.parts) == 1 and shipped.is_file():
        path = shipped
    spec = _read_spec(path)
    base = path.parent / spec["base"]
    if runs_dir is None and spec.get("runs_dir"):
        runs_dir = spec["runs_dir"] if storage.is_remote(spec["runs_dir"]) else path.parent / spec["runs_dir"]
    runs_dir = storage.location(runs_dir if runs_dir is not None else Path("runs/sweeps") / spec["name"])
    launch = spec.get("launch") or {}
    bad = sorted(set(launch) - {"tpu_vm", "xpk"})
    if bad or not all(isinstance(v, list) for v in launch.values()):
        raise ConfigError(f"{path}: launch maps tpu_vm or xpk to a list of arguments (got {bad or launch})")
    common = tuple(_as_overrides(spec.get("overrides"), f"{path}: overrides"))
    return Sweep(
        name=spec["name"],
        title=spec.get("title", spec["name"]),
        description=str(spec.get("description", "")).strip(),
        spec_path=path,
        base=base,
        common=common,
        runs=tuple(_expand(spec, path, base, common, runs_dir)),
        launch={k: tuple(str(a) for a in v) for k, v in launch.items()},
    )


def train_command(sweep: Sweep, run: Run) -> list[str]:
    """`moe train` for one run, as run here by `moe sweep`: its progress bar is the run's
    (on a terminal, unless the sweep was given --no-progress)."""
    return [
        sys.executable,
        "-m",
        "moe",
        "train",
        str(sweep.base),
        "--run-dir",
        str(run.run_dir),
        *([] if progress.shown() else ["--no-progress"]),
        *run.overrides,
    ]


def launch_command(sweep: Sweep, run: Run, launcher: str) -> list[str]:
    """The launch script invocation that trains one run on a TPU VM, a GKE cluster or here."""
    script = str(config_lib.shipped("launch") / f"{launcher}.sh")
    cloud_name = _slug(f"{sweep.name}-{run.name}").replace("_", "-").replace(".", "-").lower()
    head = {"local": [], "tpu_vm": ["--name", cloud_name], "xpk": ["--workload", cloud_name]}[launcher]
    return [
        "bash",
        script,
        *head,
        *sweep.launch.get(launcher, ()),
        "--run-dir",
        str(run.run_dir),
        str(sweep.base),
        *run.overrides,
    ]


def select(sweep: Sweep, only: list[str] | None) -> list[Run]:
    if not only:
        return list(sweep.runs)
    chosen = [r for r in sweep.runs if any(o in (r.name, r.variant) for o in only)]
    if not chosen:
        raise ConfigError(f"--only {only} matches no run; runs are {[r.name for r in sweep.runs]}")
    return chosen


def _train(command: list[str]) -> tuple[int, str | None]:
    """Run one training process to its end; SIGINT / SIGTERM sent to the sweep reach it, and
    the sweep waits for it to save its checkpoint. Returns (exit code, signal name or None)."""
    stopped = []
    child = subprocess.Popen(command)

    def forward(signum, frame):
        stopped.append(signal.Signals(signum).name)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, (stopped[0] if stopped else None)


def run_local(sweep: Sweep, runs: list[Run], dry_run: bool = False, out=None) -> list[str]:
    """Train every unfinished run, one after another; returns the names of runs that failed."""
    out = out or sys.stdout
    failed = []
    for i, run in enumerate(runs, 1):
        if run.finished():
            print(f"[{i}/{len(runs)}] {run.name}: finished, skipped", file=out, flush=True)
            continue
        command = train_command(sweep, run)
        print(f"[{i}/{len(runs)}] {run.name}: {shlex.join(command)}", file=out, flush=True)
        if dry_run:
            continue
        code, stopped = _train(command)
        if stopped:
            raise KeyboardInterrupt(f"{stopped} received while training {run.name}; it saved a checkpoint")
        if code != 0:
            print(
                f"[{i}/{len(runs)}] {run.name}: failed (exit {code}); see {run.run_dir}/train.log", file=out, flush=True
            )
            failed.append(run.name)
        elif not run.finished():
            raise KeyboardInterrupt(f"{run.name} stopped before its last step (a signal?)")
    return failed


def print_launches(sweep: Sweep, runs: list[Run], launcher: str, out=None) -> None:
    out = out or sys.stdout
    for run in runs:
        if run.finished():
            print(f"# {run.name}: finished", file=out)
        else:
            print(shlex.join(launch_command(sweep, run, launcher)), file=out)
