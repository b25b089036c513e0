"""`train.init_from`: a run's starting weights from a Hugging Face folder, a `moe convert
from-hf` output, a run directory (its newest checkpoint) or one checkpoint step.

Only params are read (the optimizer starts fresh at step 0), each array straight into its
place on the mesh: an Orbax source is restored with the target shardings (each process
reads only its own shards), and a Hugging Face source is read tensor by tensor for the
layers and experts each device holds, so no host ever holds the whole model. The source's
architecture must be the run's (every field but the compute settings); a tensor of an
unexpected shape is named.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from moe import storage
from moe.checkpoint.params import ParamReader, restore_params
from moe.checkpoint.runs import HINT, SourceError, checkpoint_of, is_hf
from moe.config import Config, ModelConfig, architecture_diffs
from moe.convert.hf import ConversionError, SafetensorsSource, check_tensors, read_hf_config
from moe.quant import params as qparams
from moe.quant import store


class InitFromError(ValueError):
    """train.init_from cannot be used for this run; the message says why and what to do."""


def _check_architecture(source: ModelConfig, ours: ModelConfig, where: str) -> None:
    diffs = architecture_diffs(source, ours)
    if diffs:
        listed = ", ".join(f"model.{name} is {theirs} there but {mine} here" for name, theirs, mine in diffs)
        fix = " ".join(f"model.{name}={theirs}" for name, theirs, _ in diffs)
        raise InitFromError(
            f"train.init_from {where} is a different architecture: {listed}; set {fix} "
            "(or start from a checkpoint of this architecture)"
        )


def _shape_error(where: str, name: str, found, expected) -> InitFromError:
    return InitFromError(
        f"train.init_from {where}: tensor {name} has shape {tuple(found)}, but the run's model "
        f"needs {tuple(expected)}; the checkpoint does not match its own config"
    )


def _restore_orbax(path: Path, target, quant):
    """(source ModelConfig, a function giving the params restored onto their shardings).
    A quantized source (`moe quantize`) is read as it is stored when the run's `quant`
    section is the source's (QLoRA straight from 4-bit weights)."""
    try:
        params_dir, _, source_cfg = checkpoint_of(path)
    except SourceError as e:
        raise InitFromError(f"train.init_from {path}: {e}") from None
    if source_cfg.lora.rank is not None:
        raise InitFromError(
            f"train.init_from {path} is a LoRA run (adapters only); merge it first with "
            f"`moe lora merge {path} OUT` and start from OUT"
        )
    if source_cfg.quant.base is not None:
        return source_cfg.model, _quantized_reader(path, params_dir, source_cfg, target, quant)

    def load():
        reader = ParamReader(params_dir)
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
            name = tuple(k.key for k in key_path)
            try:
                found = reader.shape(name)
            except ValueError:
                raise InitFromError(f"train.init_from {path}: no tensor {'.'.join(name)} in {params_dir}") from None
            if found != tuple(leaf.shape):
                raise _shape_error(str(path), ".".join(name), found, leaf.shape)
        return restore_params(params_dir, target)

    return source_cfg.model, load


def _quantized_reader(path: Path, params_dir: Path, source_cfg: Config, target, quant):
    if source_cfg.quant != quant:
        raise InitFromError(
            f"train.init_from {path} holds weights quantized as {source_cfg.quant.base} "
            f"(quant: {dataclasses.asdict(source_cfg.quant)}); a run starts from it with the same "
            "quant section (QLoRA: lora.rank set), or from its full-precision source"
        )

    def load():
        params = store.from_storage(restore_params(params_dir), store.shapes(source_cfg))
        flat_target = {tuple(k.key for k in kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}

        def place(key_path, x):
            leaf = flat_target[tuple(k.key for k in key_path)]
            if isinstance(x, qparams.QArray):
                return jax.device_put(x, qparams.leaf_shardings(x, leaf.sharding))
            return jax.device_put(np.asarray(x).astype(leaf.dtype), leaf.sharding)

        return jax.tree_util.tree_map_with_path(place, params, is_leaf=lambda x: isinstance(x, qparams.QArray))

    return load


def _hf_reader(path: Path, target):
    """(source ModelConfig, a function giving the params on their shardings)."""
    try:
        source_model, _ = read_hf_config(path)
        source = SafetensorsSource(path)
    except (ConversionError, OSError, ValueError) as e:
        raise InitFromError(f"train.init_from {path}: {e}") from None

    def load():
        try:
            by_path: dict[tuple, list] = {}
            for e in check_tensors(source_model, source):
                by_path.setdefault(e.rule.ours, []).append(e)
        except ConversionError as e:
            raise InitFromError(f"train.init_from {path}: {e}") from None
        return jax.tree_util.tree_map_with_path(
            lambda kp, leaf: _hf_array(source, source_model, by_path[tuple(k.key for k in kp)], leaf), target
        )

    return source_model, load


def _hf_array(source, model: ModelConfig, entries: list, leaf):
    """One param array on its sharding, each device's block read from the HF tensors it covers."""
    depth = len(entries[0].index)  # 0: whole tensor; 1: per layer; 2: per layer and expert
    by_index = {e.index: e for e in entries}
    dtype = np.dtype(leaf.dtype)

    def block(index):  # index: a tuple of slices of the full array
        lead = [range(*s.indices(leaf.shape[i])) for i, s in enumerate(index[:depth])]
        rest = tuple(index[depth:])
        if depth == 0:
            e = entries[0]
            return np.asarray(e.rule.to_ours(source.get(e.hf_name), model))[rest].astype(dtype)
        rest_shape = [len(range(*s.indices(n))) for s, n in zip(rest, leaf.shape[depth:])]
        out = np.empty([len(r) for r in lead] + rest_shape, dtype)
        for pos in np.ndindex(*out.shape[:depth]):
            e = by_index[tuple(r[i] for r, i in zip(lead, pos))]
            out[pos] = np.asarray(e.rule.to_ours(source.get(e.hf_name), model))[rest]
        return out

    return jax.make_array_from_callback(leaf.shape, leaf.sharding, block)


def _reader(cfg: Config, target):
    path = storage.location(cfg.train.init_from)  # local or gs:// (a Hugging Face folder must be local)
    if not path.is_dir():
        raise InitFromError(f"train.init_from {path}: no such directory; {HINT}")
    source_model, read = _hf_reader(path, target) if is_hf(path) else _restore_orbax(path, target, cfg.quant)
    _check_architecture(source_model, cfg.model, str(path))
    return read


def check(cfg: Config) -> None:
    """Refuse a missing source, a LoRA run or another architecture, reading configs only."""
    if cfg.train.init_from is not None:
        _reader(cfg, None)


def load(cfg: Config, target) -> dict:
    """The params of cfg.train.init_from, shaped, typed and placed as `target` (a tree of
    ShapeDtypeStructs with shardings: the base model's params, no adapters)."""
    return _reader(cfg, target)()
