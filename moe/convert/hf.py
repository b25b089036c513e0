"""Hugging Face checkpoints (config.json + sharded safetensors) <-> our params.

Both directions walk the table of moe/convert/table.py one Hugging Face tensor at a time:
a tensor is read, reshaped and written before the next is touched, so converting from or
to disk needs host memory for about one tensor plus one output shard, whatever the model.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from moe import config as config_lib
from moe import progress, storage
from moe.checkpoint.params import ParamReader, ParamWriter
from moe.checkpoint.runs import checkpoint_of
from moe.config import ModelConfig
from moe.convert.hf_tokenizer import default_tokenizer, tokenizer_model, write_tokenizer
from moe.convert.table import (
    CLASS_OF,
    ConversionError,
    Entry,
    entries,
    family,
    hf_config_from_model,
    model_config_from_hf,
)
from moe.model import param_shapes

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
INDEX_FILE = "model.safetensors.index.json"


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype not in NP_DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(NP_DTYPES)}, got {dtype!r}")
    return array.astype(NP_DTYPES[dtype], copy=False)


# ----------------------------------------------------------------------------- reading HF


class SafetensorsSource:
    """The tensors of a Hugging Face folder, read one at a time (single or sharded files)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            self.file_of = dict(json.loads(index.read_text())["weight_map"])
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"{self.dir} holds no *.safetensors files (PyTorch .bin is not read)")
            self.file_of = {}
            for file in files:
                with safe_open(file, "numpy") as f:
                    self.file_of.update({name: file.name for name in f.keys()})
        self.shapes = {}
        for file in sorted(set(self.file_of.values())):
            with safe_open(self.dir / file, "numpy") as f:
                for name in f.keys():
                    self.shapes[name] = tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        with safe_open(self.dir / self.file_of[name], "numpy") as f:  # mmap closed after each tensor
            return f.get_tensor(name)


def read_hf_config(hf_dir: str | Path) -> tuple[ModelConfig, dict]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir} has no config.json; is it a Hugging Face model folder?")
    hf = json.loads(path.read_text())
    return model_config_from_hf(hf), hf


def check_tensors(cfg: ModelConfig, source: SafetensorsSource) -> list[Entry]:
    """All expected tensors present with the expected shapes, and nothing else."""
    expected = list(entries(cfg))
    names = {e.hf_name for e in expected}
    missing = [e.hf_name for e in expected if e.hf_name not in source.shapes]
    unexpected = sorted(set(source.shapes) - names)
    if missing:
        raise ConversionError(f"{len(missing)} tensors missing from {source.dir}, e.g. {missing[:3]}")
    if unexpected:
        raise ConversionError(
            f"{len(unexpected)} unexpected tensors in {source.dir} that this "
            f"{CLASS_OF[family(cfg)]} model has no place for, e.g. {unexpected[:3]}"
        )
    for e in expected:
        want = tuple(e.rule.hf_shape(cfg))
        if source.shapes[e.hf_name] != want:
            raise ConversionError(
                f"tensor {e.hf_name}: expected shape {want} from config.json, found {source.shapes[e.hf_name]}"
            )
    return expected


def hf_to_params(
    cfg: ModelConfig, source: SafetensorsSource, write: Callable, dtype: str, desc: str = "reading Hugging Face tensors"
) -> None:
    """Feed every tensor, reshaped to our layout, to write(path, index, array)."""
    for e in progress.bar(check_tensors(cfg, source), desc=desc, unit="tensor"):
        write(e.rule.ours, e.index, _cast(e.rule.to_ours(source.get(e.hf_name), cfg), dtype))


def _leaf(params: dict, path: tuple[str, ...]):
    for key in path:
        params = params[key]
    return params


def load_hf(hf_dir: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from a Hugging Face Mistral or Mixtral folder, in host memory."""
    cfg, _ = read_hf_config(hf_dir)
    shapes = param_shapes(cfg)
    params = jax.tree_util.tree_map(lambda s: np.empty(s.shape, NP_DTYPES[cfg.param_dtype]), shapes)

    def write(path, index, array):
        _leaf(params, path)[index] = array

    hf_to_params(cfg, SafetensorsSource(hf_dir), write, cfg.param_dtype)
    return cfg, params


def convert_from_hf(hf_dir: str | Path, out_dir: str | Path, dtype: str = "auto") -> ModelConfig:
    """Stream a Hugging Face folder into OUT_DIR/params (Orbax) + OUT_DIR/config.yaml."""
    cfg, _ = read_hf_config(hf_dir)
    if dtype != "auto":
        cfg = dataclasses.replace(cfg, param_dtype=dtype)
    source = SafetensorsSource(hf_dir)
    check_tensors(cfg, source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = ParamWriter(out / "params", param_shapes(cfg))
    hf_to_params(cfg, source, writer.write, cfg.param_dtype)
    writer.close()
    train = config_lib.TrainConfig(seq_len=min(config_lib.TrainConfig.seq_len, cfg.max_seq_len))
    (out / "config.yaml").write_text(config_lib.dump(config_lib.Config(model=cfg, train=train)))
    if (Path(hf_dir) / "tokenizer.model").is_file():
        shutil.copy(Path(hf_dir) / "tokenizer.model", out / "tokenizer.model")
    return cfg


# ----------------------------------------------------------------------------- writing HF


def parse_size(text: str | int) -> int:
    """'5GB', '200MB', '1.5GiB' or a byte count."""
    if isinstance(text, int):
        return text
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    s = text.strip().upper()
    for unit, factor in units.items():
        number = s[: -len(unit)].strip()
        if s.endswith(unit) and re.fullmatch(r"\d+(\.\d*)?", number):
            return int(float(number) * factor)
    if s.isdigit():
        return int(s)
    raise ConversionError(f"cannot read the size {text!r}; write e.g. 5GB, 500MB or a byte count")


class ShardedWriter:
    """Writes model-0000K-of-0000N.safetensors as tensors arrive, one shard in memory."""

    def __init__(self, out_dir: Path, plan: list[list[str]]):
        self.out_dir, self.plan = out_dir, plan
        self.shard_of = {name: i for i, names in enumerate(plan) for name in names}
        self.pending: dict[int, dict] = {}
        self.total_size = 0

    def file_name(self, i: int) -> str:
        n = len(self.plan)
        return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"

    def add(self, name: str, array: np.ndarray) -> None:
        i = self.shard_of[name]
        shard = self.pending.setdefault(i, {})
        shard[name] = np.ascontiguousarray(array)
        self.total_size += array.nbytes
        if len(shard) == len(self.plan[i]):
            save_file(shard, self.out_dir / self.file_name(i), metadata={"format": "pt"})
            del self.pending[i]

    def finish(self) -> None:
        if self.pending:
            raise ConversionError(f"shards {sorted(self.pending)} were never completed")
        if len(self.plan) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {name: self.file_name(i) for name, i in self.shard_of.items()},
            }
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def shard_plan(cfg: ModelConfig, dtype: str, max_shard_size: int) -> list[list[str]]:
    """Group tensors, in order, into shards of at most max_shard_size bytes (a bigger
    tensor gets a shard of its own)."""
    plan, size = [[]], 0
    itemsize = NP_DTYPES[dtype].itemsize
    for e in entries(cfg):
        nbytes = int(np.prod(e.rule.hf_shape(cfg))) * itemsize
        if plan[-1] and size + nbytes > max_shard_size:
            plan.append([])
            size = 0
        plan[-1].append(e.hf_name)
        size += nbytes
    return plan


def params_to_hf(
    cfg: ModelConfig,
    read: Callable,
    out_dir: str | Path,
    dtype: str,
    max_shard_size: int | str = "5GB",
    tokenizer: str | Path | None = None,
) -> None:
    """Write a Hugging Face folder from read(path, index) -> our slice."""
    _cast(np.zeros(1), dtype)  # refuse an unknown dtype or tokenizer before writing anything
    model_file = None if tokenizer is None else tokenizer_model(tokenizer, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(out, shard_plan(cfg, dtype, parse_size(max_shard_size)))
    for e in progress.bar(list(entries(cfg)), desc="writing Hugging Face tensors", unit="tensor"):
        writer.add(e.hf_name, _cast(e.rule.to_hf(np.asarray(read(e.rule.ours, e.index)), cfg), dtype))
    writer.finish()
    (out / "config.json").write_text(json.dumps(hf_config_from_model(cfg, dtype), indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if model_file is not None:
        write_tokenizer(out, model_file, cfg)


def save_hf(
    cfg: ModelConfig, params, out_dir: str | Path, dtype: str | None = None, max_shard_size: int | str = "5GB"
) -> None:
    """Write in-memory params as a Hugging Face folder (config.json + safetensors)."""

    def read(path, index):
        leaf = _leaf(params, path)
        return np.asarray(leaf[index] if index else leaf)

    params_to_hf(cfg, read, out_dir, dtype or cfg.param_dtype, max_shard_size)


def convert_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "auto",
    max_shard_size: str = "5GB",
    tokenizer: str | Path | None = None,
) -> ModelConfig:
    """Stream an Orbax params checkpoint (a run directory's newest, a checkpoint step or a
    converted folder) into a Hugging Face folder, with its tokenizer: `tokenizer` (a .model
    path or "mistral-v1"), by default the converted folder's or the run's data.tokenizer."""
    params_dir, step, run_cfg = checkpoint_of(storage.absolute(ckpt_dir))
    cfg = run_cfg.model
    reader = ParamReader(params_dir)
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]:
        path = tuple(k.key for k in key_path)
        found = reader.shape(path)
        if found != tuple(leaf.shape):
            raise ConversionError(
                f"checkpoint array {'.'.join(path)} has shape {found}, but {step}'s config implies {tuple(leaf.shape)}"
            )
    if dtype == "auto":
        dtype = "bfloat16" if reader.dtype(("embed", "embedding")) == NP_DTYPES["bfloat16"] else "float32"
    if tokenizer is None:  # a converted folder's own, else the one the run trained with
        own = params_dir.parent / "tokenizer.model"
        tokenizer = default_tokenizer(own if own.is_file() else run_cfg.data.tokenizer, cfg)
    params_to_hf(cfg, reader.read, out_dir, dtype, max_shard_size, tokenizer)
    return cfg
