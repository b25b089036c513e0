"""A run's checkpoints, and where any params checkpoint is found.

A run directory holds DIR/checkpoints/<step>/{params, opt_state, data, meta} (written by
`RunCheckpoints`) and DIR/config.yaml; a `moe convert from-hf`, `moe quantize`, `moe upcycle`
or `moe lora merge` output holds params/ and config.yaml. `checkpoint_of` accepts either, a
run directory meaning its newest finished step; every command that reads a model goes
through it, so they all accept the same paths.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import orbax.checkpoint as ocp
from etils import epath

from moe import config as config_lib
from moe import storage
from moe.config import Config, ConfigError

HINT = "give a Hugging Face folder, a `moe convert from-hf` output, a run directory or a checkpoint step"


class SourceError(ValueError):
    """A model source that cannot be read; the message says what was expected."""


def is_hf(path: Path) -> bool:
    """True for a Hugging Face model folder (config.json, and no config.yaml of ours)."""
    return (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def newest_step(run_dir: Path) -> Path:
    """The newest finished checkpoint step of a run directory."""
    steps = sorted(
        (int(p.name), p)
        for p in (run_dir / "checkpoints").iterdir()
        if p.name.isdigit() and (p / "params" / "_METADATA").exists()
    )
    if not steps:
        raise SourceError(
            f"{run_dir} is a run directory without a finished checkpoint; train it further "
            "or give a checkpoint step directory"
        )
    return steps[-1][1]


def find_checkpoint(ckpt_dir: str | Path) -> tuple[Path, Path]:
    """(params dir, config.yaml) of a converted checkpoint or a training step directory."""
    ckpt = storage.absolute(ckpt_dir)  # local or gs://
    params = ckpt / "params" if (ckpt / "params" / "_METADATA").exists() else ckpt
    if not (params / "_METADATA").exists():
        raise SourceError(
            f"{ckpt} holds no Orbax params checkpoint (looked for params/_METADATA); "
            "give a run directory, one of its checkpoints/<step> folders or a converted output"
        )
    for folder in [ckpt, *ckpt.parents[:3]]:
        if (folder / "config.yaml").is_file():
            return params, folder / "config.yaml"
    raise SourceError(f"no config.yaml found in {ckpt} or the three folders above it")


def checkpoint_of(path: Path) -> tuple[Path, Path, Config]:
    """(params dir, the step dir it belongs to, the run's config) of a run directory (its
    newest checkpoint), a checkpoint step or a converted folder."""
    step = newest_step(path) if (path / "checkpoints").is_dir() else path
    try:
        params_dir, config_path = find_checkpoint(step)
        return params_dir, step, config_lib.load(config_path)
    except SourceError as e:
        raise SourceError(f"{e}; {HINT}") from None
    except (ConfigError, OSError, ValueError) as e:
        raise SourceError(f"{step}: {e}; {HINT}") from None


class RunCheckpoints:
    """A run's checkpoints: DIR/checkpoints/<step>/{params, opt_state, data, meta}.

    Orbax writes each checkpoint into a temporary folder and renames it when complete, so
    a kill during a save leaves the earlier checkpoints as they were; `restore_latest`
    falls back to an older checkpoint, with a warning, when the newest cannot be read.
    """

    ITEMS = ("params", "opt_state", "data", "meta")

    def __init__(self, directory: str | Path, keep: int, async_save: bool):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(storage.absolute(directory), options=options, item_names=self.ITEMS)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, data_state: dict, meta: dict) -> None:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_params, abstract_opt_state):
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        restored = self.manager.restore(step, args=args)
        return restored.params, restored.opt_state, restored.data, restored.meta

    def restore_latest(self, abstract_params, abstract_opt_state):
        """(step, params, opt_state, data_state, meta) of the newest readable checkpoint, or None."""
        for step in reversed(self.steps()):
            try:
                return (step, *self.restore(step, abstract_params, abstract_opt_state))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
                kept = self._set_aside(step)
                warnings.warn(
                    f"checkpoint at step {step} cannot be restored ({type(e).__name__}: "
                    f"{str(e)[:300]}); moved it to {kept} and falling back to the previous one",
                    stacklevel=2,
                )
        return None

    def _set_aside(self, step: int) -> Path:
        """Rename a damaged checkpoint out of the way (kept for inspection, never reused)."""
        folder = epath.Path(self.manager.directory) / str(step)
        target = folder.with_name(f"{step}.damaged-{int(time.time())}")
        folder.rename(target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        """Block until every asynchronous save has been written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
