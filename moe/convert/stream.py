"""A checkpoint read tensor slice by tensor slice, whatever its kind: `open_source(path)`
gives (its Config, feed) where feed(write) calls write(path, index, array) for every slice
(a layer, or one layer's expert), so a command that rewrites weights (`moe quantize`,
`moe upcycle`) never holds the whole model."""

from __future__ import annotations

import contextlib
import itertools
import shutil
from pathlib import Path

import jax

from moe import config as config_lib
from moe import progress
from moe.checkpoint.params import ParamReader
from moe.checkpoint.runs import HINT, checkpoint_of, is_hf
from moe.convert.hf import SafetensorsSource, hf_to_params, read_hf_config
from moe.model import param_shapes


def _hf(path: Path, desc: str):
    model, _ = read_hf_config(path)
    return config_lib.Config(model=model), lambda write: hf_to_params(
        model, SafetensorsSource(path), write, model.param_dtype, desc
    )


def _orbax(path: Path, desc: str):
    params_dir, _, cfg = checkpoint_of(path)
    slices = []  # (name, index): one layer at a time
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(cfg.model))[0]:
        name = tuple(k.key for k in key_path)
        depth = 1 if name[0] == "layers" else 0
        slices += [(name, index) for index in itertools.product(*(range(n) for n in leaf.shape[:depth]))]

    def feed(write):
        reader = ParamReader(params_dir)
        for name, index in progress.bar(slices, desc=desc, unit="slice"):
            write(name, index, reader.read(name, index))

    return cfg, feed


@contextlib.contextmanager
def written_atomically(out_dir: Path, source: Path):
    """A new checkpoint folder: yields OUT.partial to write into, then copies the source's
    tokenizer.model beside it and renames it to OUT; on any failure it is removed, so OUT
    exists only complete."""
    if out_dir.exists():
        raise ValueError(f"{out_dir} exists; choose a new output folder")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if (source / "tokenizer.model").is_file():
            shutil.copy(source / "tokenizer.model", tmp / "tokenizer.model")
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_source(path: Path, desc: str = "reading weights"):
    """(Config, feed) of a Hugging Face folder, converted folder, run or checkpoint step;
    feed shows a progress bar described by desc. For an Orbax source the config is the
    run's: callers refuse what they cannot read (quantized params, LoRA adapters) before
    feeding."""
    if not path.is_dir():
        raise ValueError(f"{path}: no such directory; {HINT}")
    return (_hf if is_hf(path) else _orbax)(path, desc)
