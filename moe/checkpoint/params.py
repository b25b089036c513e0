"""Orbax checkpoints of model params, written whole or streamed one slice at a time.

A params checkpoint is an Orbax PyTree checkpoint; `restore_params` reads it back (any
mesh, any dtype). `ParamWriter` builds one without ever holding a stacked array in host
memory: Orbax writes the tree's structure, then each array is (re)created at its full
shape with one storage chunk per slice [layer] or [layer, expert], and slices are written
as they arrive. `ParamReader` reads such slices back. Both go through Orbax's own
TensorStore specs, so the files are exactly what Orbax writes and reads.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from moe import storage

# Orbax logs a warning for every array opened without a shared TensorStore context.
logging.getLogger("absl").setLevel(logging.ERROR)


def array_name(path: tuple[str, ...]) -> str:
    """Orbax's name for the array at a param path: keys joined by dots."""
    return ".".join(path)


def save_params(directory: str | Path, params) -> None:
    """Save a whole param tree (arrays in memory) as an Orbax checkpoint."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(storage.absolute(directory), params)
    checkpointer.wait_until_finished()


def restore_params(directory: str | Path, target=None):
    """Restore a params checkpoint; `target` (ShapeDtypeStructs, maybe sharded) sets the
    dtype and placement of each array. Without it, arrays come back as numpy."""
    path = storage.absolute(directory)
    if not (path / "_METADATA").exists():
        raise FileNotFoundError(f"{path} is not an Orbax params checkpoint (no _METADATA in it)")
    checkpointer = ocp.PyTreeCheckpointer()
    if target is None:  # numpy on the host, not the saving run's device placement (and no
        # warning that reusing it is unsafe on another topology: it is not reused)
        tree = checkpointer.metadata(path).item_metadata.tree
        as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    args = ocp.checkpoint_utils.construct_restore_args(target)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=args))


class ParamWriter:
    """Stream slices into a params checkpoint whose tree is given by `shapes`.

    shapes: a tree of jax.ShapeDtypeStruct. `write(path, index, array)` stores `array`
    at `params[path][index]`; `close()` checks that every slice was written.
    """

    def __init__(self, directory: str | Path, shapes):
        self.directory = storage.absolute(directory)
        placeholder = jax.tree_util.tree_map(lambda s: np.zeros((1,) * len(s.shape), s.dtype), shapes)
        ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)).save(self.directory, placeholder)
        self._stores, self._written = {}, {}
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
            path = tuple(k.key for k in key_path)
            self._stores[path] = (leaf, None)
            self._written[path] = set()

    def _open(self, path: tuple[str, ...], index_len: int):
        leaf, store = self._stores[path]
        if store is None:
            shape = tuple(leaf.shape)
            chunks = (1,) * index_len + shape[index_len:]
            info = ocp.type_handlers.ParamInfo(name=array_name(path), parent_dir=self.directory, use_zarr3=False)
            spec = ocp.type_handlers.get_json_tspec_write(
                info, use_ocdbt=False, global_shape=shape, local_shape=shape, dtype=np.dtype(leaf.dtype)
            )
            spec["metadata"]["chunks"] = chunks
            store = ts.open(spec, create=True, delete_existing=True).result()
            self._stores[path] = (leaf, store)
        return leaf, store

    def write(self, path: tuple[str, ...], index: tuple[int, ...], array: np.ndarray) -> None:
        leaf, store = self._open(path, len(index))
        expected = tuple(leaf.shape[len(index) :])
        if tuple(array.shape) != expected:
            raise ValueError(f"{array_name(path)}{list(index)}: expected shape {expected}, got {array.shape}")
        store[index].write(np.asarray(array, dtype=leaf.dtype)).result()
        self._written[path].add(index)

    def close(self) -> None:
        """Raise unless every slice of every array was written."""
        for path, (leaf, _) in self._stores.items():
            written = self._written[path]
            depth = len(next(iter(written))) if written else 0
            expected = math.prod(leaf.shape[:depth])
            if len(written) != expected:
                raise ValueError(f"{array_name(path)}: {len(written)} of {expected} slices were written")


class ParamReader:
    """Read slices of a params checkpoint (OCDBT or not) without loading whole arrays."""

    def __init__(self, directory: str | Path):
        self.directory = storage.absolute(directory)
        if not (self.directory / "_METADATA").exists():
            raise FileNotFoundError(f"{self.directory} is not an Orbax params checkpoint (no _METADATA in it)")
        self.use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(self.directory)
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self.use_ocdbt)
        self._stores = {}

    def _store(self, path: tuple[str, ...]):
        if path not in self._stores:
            info = ocp.type_handlers.ParamInfo(name=array_name(path), parent_dir=self.directory, use_zarr3=False)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self.use_ocdbt)
            try:
                self._stores[path] = ts.open(spec, context=self._context).result()
            except ValueError as e:
                raise ValueError(f"{self.directory} has no array {array_name(path)}: {e}") from None
        return self._stores[path]

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self._store(path).shape)

    def dtype(self, path: tuple[str, ...]) -> np.dtype:
        return np.dtype(self._store(path).dtype.numpy_dtype)

    def read(self, path: tuple[str, ...], index: tuple[int, ...]) -> np.ndarray:
        return np.asarray(self._store(path)[index].read().result())
