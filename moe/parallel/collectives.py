"""jax.lax.ragged_all_to_all wherever the program runs.

TPU and GPU have the primitive; XLA:CPU does not ("HLO opcode `ragged-all-to-all` is not
supported by XLA:CPU"). On CPU the same call runs through `emulated_ragged_all_to_all`, which
has the primitive's exact semantics (see jax.lax.ragged_all_to_all's docstring) built from a
padded all_to_all: every slice padded to the operand's length, exchanged, and written at the
offsets the senders chose. The choice is made when the program is lowered, so `moe aot` on a
CPU host compiles the real primitive into a TPU plan.

Used with one slice per peer: input_offsets, send_sizes, output_offsets and recv_sizes have
the length of the mapped axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """ragged_all_to_all from a padded all_to_all: memory [peers, operand rows, ...] per
    device (the worst case the real primitive avoids), exact in value and gradient."""
    peers = input_offsets.shape[0]
    rows = operand.shape[0]  # no slice is longer than the operand
    step = jnp.arange(rows)
    take = jnp.clip(input_offsets[:, None] + step, 0, rows - 1)  # [peers, rows]
    mask = (step < send_sizes[:, None]).reshape(peers, rows, *(1,) * (operand.ndim - 1))
    send = jnp.where(mask, operand[take], jnp.zeros((), operand.dtype))  # [peers, rows, ...]
    exchange = functools.partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=0, concat_axis=0, tiled=True)
    received = exchange(send.reshape(peers * rows, *operand.shape[1:]))  # slice from peer i at [i * rows, ...]
    where = exchange(output_offsets)  # where each peer asked its slice to go here
    dest = where[:, None] + step
    dest = jnp.where(step < recv_sizes[:, None], dest, output.shape[0])  # past the end: not written
    return output.at[dest.reshape(-1)].set(received, mode="drop")


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """jax.lax.ragged_all_to_all, emulated on CPU (chosen when lowered)."""
    args = (operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)
    return jax.lax.platform_dependent(
        *args,
        cpu=functools.partial(emulated_ragged_all_to_all, axis_name=axis_name),
        default=functools.partial(jax.lax.ragged_all_to_all, axis_name=axis_name),
    )
