"""The train state laid out on a mesh: every parameter's sharding from its logical axes and
the rules preset (moe/parallel/mesh.py), optimizer leaves laid out like the parameters they
mirror, and the abstract state that restores and compiles target, allocating nothing."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
from jax.sharding import Mesh

from moe.config import Config
from moe.model import init_boxed, logical_axes
from moe.parallel.mesh import replicated, rules
from moe.training.step import fresh_state
from moe.training.trainable import lora_of


def bytes_per_device(tree) -> dict:
    """Bytes each device holds of a tree of jax.Arrays, keyed by device id."""
    held: dict = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    return held


def _dict_path(path) -> tuple[str, ...]:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def param_shardings(cfg: Config, mesh: Mesh):
    """NamedSharding of every parameter (LoRA adapters included), from its logical axes and
    the rules preset."""
    return nn.logical_to_mesh_sharding(logical_axes(cfg.model, lora_of(cfg)), mesh, rules(cfg))


@functools.lru_cache(maxsize=8)
def _param_layout(cfg: Config, mesh: Mesh) -> dict:
    """{param path: (shape, sharding)}, from one shape evaluation of the model (cached: the
    state, the frozen params and the init_from target all ask at start-up)."""
    boxed = jax.eval_shape(lambda: init_boxed(cfg.model, jax.random.key(0), lora_of(cfg)))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules(cfg))
    flat = jax.tree_util.tree_flatten_with_path
    shapes = {_dict_path(p): leaf.shape for p, leaf in flat(nn.unbox(boxed))[0]}
    return {_dict_path(p): (shapes[_dict_path(p)], s) for p, s in flat(shardings)[0]}


def like_params(cfg: Config, mesh: Mesh, tree):
    """Shardings for `tree`: each leaf whose path ends like a parameter's path, with that
    parameter's shape, is laid out like it (a subset of the params, Adam's mu and nu);
    everything else is replicated."""
    layout = _param_layout(cfg, mesh)

    def like_param(path, leaf):
        names = _dict_path(path)
        for start in range(len(names)):
            shape, sharding = layout.get(names[start:], (None, None))
            if shape == leaf.shape:
                return sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(like_param, tree)


def state_shardings(cfg: Config, mesh: Mesh, abstract_state):
    """Shardings of a TrainState: params by the rules; optimizer leaves that mirror a
    parameter (Adam's mu and nu) like that parameter; everything else replicated."""
    return type(abstract_state)(
        replicated(mesh),
        like_params(cfg, mesh, abstract_state.params),
        like_params(cfg, mesh, abstract_state.opt_state),
    )


def with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree` that carry their shardings (restore and compile targets)."""
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_state(cfg: Config, mesh: Mesh):
    """(the TrainState as sharded ShapeDtypeStructs, its shardings), allocating nothing."""
    abstract = jax.eval_shape(lambda r: fresh_state(cfg, r), jax.random.key(cfg.seed))
    shardings = state_shardings(cfg, mesh, abstract)
    return with_shardings(abstract, shardings), shardings
