"""LoRA adapters served unmerged beside the base, several in one decode step.

Each `--adapter NAME=PATH` is a LoRA run of this project (its newest checkpoint, or a step)
or a PEFT folder (moe/tune/peft_import.py). Every adapter becomes pairs (A, B) per weight
with its scale folded into B. The bank stacks all adapters side by side along the rank
dimension, A = [A_1 | A_2 | ...] and B likewise (zeros where an adapter leaves a weight
alone), and the model runs with those as one adapter of rank R = sum of ranks. A row's
selector [R] is 1 on its adapter's columns and 0 elsewhere (all 0 for the base), so the
low-rank product (x A * select) B is each row's own adapter (model/lora.py): in attention,
the router, and inside every expert's dispatch, where the selector travels with the
token. A batch with no adapter row runs the base params alone and pays nothing for them;
a mixed batch pays R low-rank columns per adapted weight for every row.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moe.config import LoRAConfig, ModelConfig
from moe.convert.hf import NP_DTYPES
from moe.model.lora import is_adapter, scale
from moe.tune import peft_import
from moe.tune.merge import lora_run

# (leading expert dims, input dims) of each adaptable weight, after the layers axis
SHAPES = {("attn", "o"): (0, 2), ("moe", "w1"): (1, 1), ("moe", "w3"): (1, 1), ("moe", "w2"): (1, 1)}


def weight_dims(weight: tuple, w_shape: tuple) -> tuple[tuple, tuple, tuple]:
    """(head: layers and expert dims, input dims, output dims) of a weight's shape: an
    adapter pair is A [*head, *in, r] and B [*head, r, *out]."""
    n_lead, n_in = SHAPES.get(weight[1:], (0, 1))
    return w_shape[: 1 + n_lead], w_shape[1 + n_lead : 1 + n_lead + n_in], w_shape[1 + n_lead + n_in :]


class AdapterError(ValueError):
    """An adapter this base cannot serve; the message says what and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Adapter:
    name: str
    path: str
    pairs: dict  # {("layers", block, weight): (A [layers, *lead, *in, r], B [layers, *lead, r, *out], scaled)}
    rank: int  # columns this adapter takes in the bank (its widest pair)


def _from_run(path: Path) -> dict:
    cfg, trained, _ = lora_run(path)
    if cfg.lora.train_router:
        raise AdapterError(
            f"{path} trained the whole router, which an adapter cannot carry; serve the merged model "
            f"(`moe lora merge {path} OUT`)"
        )
    flat = traverse_util.flatten_dict(trained)
    s = scale(cfg.lora.alpha, cfg.lora.rank, cfg.lora.rslora)
    pairs = {}
    for key, a in flat.items():
        if key[-1].endswith("_lora_a"):
            weight = (*key[:-1], key[-1].removesuffix("_lora_a"))
            b = flat[(*key[:-1], f"{weight[-1]}_lora_b")]
            pairs[weight] = (np.asarray(a, np.float32), s * np.asarray(b, np.float32))
    if cfg.quant.base is not None:
        logging.info("adapter %s was trained over a %s base (QLoRA); serve it over that base", path, cfg.quant.base)
    return pairs


def _fit(weight: tuple, pair: tuple, w_shape: tuple) -> tuple:
    """The pair in the weight's layout: A [layers, *lead, *in, r], B [layers, *lead, r, *out]."""
    head, ins, outs = weight_dims(weight, w_shape)
    a, b = pair
    r = a.shape[-1]
    try:
        return a.reshape(*head, *ins, r), b.reshape(*head, r, *outs)
    except ValueError:
        raise AdapterError(
            f"adapter on {'/'.join(weight)} has shapes A {a.shape}, B {b.shape}; the served weight is {w_shape}"
        ) from None


def load(name: str, path: str | Path, model: ModelConfig, params: dict) -> Adapter:
    """The adapter at `path` (a LoRA run or step, or a PEFT folder) fitted to `params`."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"--adapter {name}={path}: no such directory; give a LoRA run, a step or a PEFT folder")
    try:
        raw = peft_import.read(path, model) if peft_import.is_peft_folder(path) else _from_run(path)
    except (peft_import.PeftError, ValueError) as e:
        raise AdapterError(f"--adapter {name}={path}: {e}") from None
    base = traverse_util.flatten_dict(params)
    pairs = {}
    for weight, pair in raw.items():
        if weight not in base:
            raise AdapterError(f"--adapter {name}={path}: adapts {'/'.join(weight)}, which the served model lacks")
        pairs[weight] = _fit(weight, pair, tuple(base[weight].shape))
    return Adapter(name, str(path), pairs, max(a.shape[-1] for a, _ in pairs.values()))


@dataclasses.dataclass(frozen=True)
class Bank:
    """The served adapters stacked: `params` is the base with every adapted weight's A and B,
    `lora` the model's view of them, `columns[name]` an adapter's (start, stop) of the rank."""

    params: dict
    lora: LoRAConfig
    columns: dict

    def select(self, names: list[str | None]) -> np.ndarray:
        """[len(names), rank] float32: each row's adapter columns (None: the base, none)."""
        out = np.zeros((len(names), self.lora.rank), np.float32)
        for row, name in enumerate(names):
            if name is not None:
                start, stop = self.columns[name]
                out[row, start:stop] = 1.0
        return out


def _padded(weight: tuple, pair: tuple | None, w_shape: tuple, rank: int) -> tuple:
    """The pair widened to `rank` columns with zeros (all zeros: an adapter without it)."""
    head, ins, outs = weight_dims(weight, w_shape)
    a, b = np.zeros((*head, *ins, rank), np.float32), np.zeros((*head, rank, *outs), np.float32)
    if pair is not None:
        r = pair[0].shape[-1]
        a[..., :r] = pair[0]
        b[(slice(None),) * len(head) + (slice(0, r),)] = pair[1]
    return a, b


def bank(params: dict, adapters: list[Adapter], param_dtype: str) -> Bank:
    """The base params with every adapter's pairs stacked along the rank (zeros where an
    adapter leaves a weight alone)."""
    base = traverse_util.flatten_dict(params)
    if any(is_adapter(p) for p in base):
        raise AdapterError("the served source already holds adapters; serve its merged model or its base")
    columns, total = {}, 0
    for adapter in adapters:
        columns[adapter.name] = (total, total + adapter.rank)
        total += adapter.rank
    dtype, flat = NP_DTYPES[param_dtype], dict(base)
    for weight in sorted({w for adapter in adapters for w in adapter.pairs}):
        w_shape = tuple(base[weight].shape)
        parts = [_padded(weight, ad.pairs.get(weight), w_shape, ad.rank) for ad in adapters]
        rank_axis = len(weight_dims(weight, w_shape)[0])  # B: [layers, *lead, rank, *out]
        a = np.concatenate([a for a, _ in parts], -1).astype(dtype)
        b = np.concatenate([b for _, b in parts], rank_axis).astype(dtype)
        flat[(*weight[:-1], f"{weight[-1]}_lora_a")], flat[(*weight[:-1], f"{weight[-1]}_lora_b")] = (
            jnp.array(a),  # copies into buffers of its own, aliasing no numpy memory
            jnp.array(b),
        )
    # a shared expert's w1, w2, w3 are the `shared` target (all three), the routed experts' their own names
    targets = tuple(sorted({"shared" if "shared" in w else w[-1] for adapter in adapters for w in adapter.pairs}))
    lora = LoRAConfig(rank=total, alpha=float(total), targets=targets)  # scale 1: each B holds its own
    return Bank(traverse_util.unflatten_dict(flat), lora, columns)
