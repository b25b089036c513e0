"""A weight-only quantized array: codes and scales for a stack of matrices, a pytree.

    q = quantize(w, "nf4-dq")        # any float array; the leading `n_lead` dims are a stack
    w_hat = q.dequantize(jnp.bfloat16)

Each matrix [rows, cols] of the stack is quantized on its own, as bitsandbytes quantizes one
tensor: its elements in row-major order, in blocks of `block_size` along the columns (and on
across rows: a block never straddles two matrices of the stack). A model weight
[..., in, out] (`n_in` input dims) is quantized in the orientation of a torch Linear,
[out, in]: blocks run along the input dimension, and an NF4 weight gets the same codes and
scales as bitsandbytes' quantize_4bit of the Hugging Face tensor.

Formats (storage per matrix; leading dims kept on every leaf, so nn.scan slices layers and
the MoE dispatch indexes experts without touching the rest):
  int8    symmetric per output row: codes int8 [rows, cols], scale f32 [rows, 1] (qwix)
  int4    symmetric per block of the row: two codes per byte, scale f32 [rows, cols/block] (qwix)
  nf4     NF4 code per element, two per byte (the first in the high nibble), absmax f32 per block
  nf4-dq  nf4 whose block absmax values, minus their mean (`offset`), are quantized with the
          signed dynamic 8-bit code in blocks of 256 (uint8 codes, f32 `scale2` per 256):
          4 + 8/64 + 32/(64*256) = 4.127 bits per parameter
int8 and int4 are qwix's symmetric integer quantization (absmax / (qmax + 0.5), rounded,
clipped). NF4 is written here, not with qwix: qwix stores one NF4 index per element without
packing and has no double quantization or bitsandbytes' block layout.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import struct

from moe.config import QUANT_FORMATS
from moe.model import codes as codes_lib

FORMATS = QUANT_FORMATS  # int8, int4, nf4, nf4-dq
BLOCK = 64  # elements per block (int4, nf4), as QLoRA and bitsandbytes
SCALE_BLOCK = 256  # block absmax values per second-level block (nf4-dq), as bitsandbytes
BITS = {
    "int8": 8.0,
    "int4": 4.0 + 32 / BLOCK,
    "nf4": 4.0 + 32 / BLOCK,
    "nf4-dq": 4.0 + 8 / BLOCK + 32 / (BLOCK * SCALE_BLOCK),
}  # bits per parameter (int8: + one f32 per row)


class QuantError(ValueError):
    """A tensor or format that cannot be quantized as asked; the message says why."""


@struct.dataclass
class QArray:
    codes: jax.Array  # int8 [..., rows, cols] | uint8 [..., bytes] (4-bit, packed)
    scale: jax.Array  # f32 [..., rows, 1] | f32 [..., rows, cols/block] | f32 [..., blocks] | uint8 [..., blocks]
    scale2: Optional[jax.Array] = None  # nf4-dq: f32 [..., ceil(blocks / 256)]
    offset: Optional[jax.Array] = None  # nf4-dq: f32 [...]
    fmt: str = struct.field(pytree_node=False, default="nf4")
    tail: tuple = struct.field(pytree_node=False, default=())  # the shape after the stack dims
    n_in: Optional[int] = struct.field(pytree_node=False, default=None)  # a weight's input dims (None: plain)
    block_size: int = struct.field(pytree_node=False, default=BLOCK)
    dtype: str = struct.field(pytree_node=False, default="float32")  # what dequantize() returns

    @property
    def lead(self) -> tuple:
        return tuple(self.codes.shape[:-2] if self.fmt == "int8" else self.codes.shape[:-1])

    @property
    def shape(self) -> tuple:
        return self.lead + tuple(self.tail)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(self))

    def astype(self, dtype) -> QArray:
        """The same codes, dequantizing to `dtype` (the compute dtype): nothing is computed here."""
        return self.replace(dtype=jnp.dtype(dtype).name)

    def __getitem__(self, index) -> QArray:
        """Index the stack dims (layers, experts) of every leaf alike."""
        return jax.tree_util.tree_map(lambda x: x[index], self)

    def dequantize(self, dtype=None) -> jax.Array:
        rows, cols = _matrix(self.tail, self.n_in)
        m = _DECODE[self.fmt](self, rows, cols)  # [..., rows, cols] float32
        if self.n_in is not None:  # a weight: back from [out, in] to [..., in dims, out dims]
            m = jnp.swapaxes(m, -1, -2)
        return m.reshape(self.shape).astype(dtype or self.dtype)


def as_array(w):
    """w itself, or a QArray dequantized to its compute dtype. The dequantized weight is
    materialized (an optimization barrier: XLA does not fuse the decoding into the matmul)
    so the matmul is the one it would be with that weight given whole: the model's output
    is bit for bit the same as with the weights dequantized first in the same program
    (tested; without the barrier it differs in the last bits)."""
    return jax.lax.optimization_barrier(w.dequantize()) if isinstance(w, QArray) else w


def _matrix(tail: tuple, n_in: Optional[int]) -> tuple[int, int]:
    """(rows, cols) of the matrix a tail shape is quantized as: [out, in] for a weight."""
    if n_in is None:
        return math.prod(tail[:-1]), (tail[-1] if tail else 1)
    return math.prod(tail[n_in:]), math.prod(tail[:n_in])


def quantize(
    array,
    fmt: str,
    block_size: int = BLOCK,
    double_quant: bool | None = None,
    n_lead: int = 0,
    n_in: Optional[int] = None,
) -> QArray:
    """`array` quantized in format `fmt`; "nf4" with double_quant=True is "nf4-dq". The first
    n_lead dims are a stack of matrices; n_in marks a weight [..., in dims, out dims]."""
    if double_quant:
        if fmt not in ("nf4", "nf4-dq"):
            raise QuantError(f"double quantization is defined for nf4 only, not {fmt!r}")
        fmt = "nf4-dq"
    if fmt not in FORMATS:
        raise QuantError(f"unknown quantization format {fmt!r}; choose from {', '.join(FORMATS)}")
    if block_size < 2 or block_size % 2:
        raise QuantError(f"block_size must be an even number >= 2, got {block_size}")
    array = jnp.asarray(array)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise QuantError(f"only float arrays quantize, got {array.dtype}")
    lead, tail = array.shape[:n_lead], array.shape[n_lead:]
    rows, cols = _matrix(tail, n_in)
    m = array.reshape(*lead, *((cols, rows) if n_in is not None else (rows, cols)))
    if n_in is not None:
        m = jnp.swapaxes(m, -1, -2)  # [..., out, in]: blocks along the input
    fields = _ENCODE[fmt](m.astype(jnp.float32), block_size)
    return QArray(
        **fields, fmt=fmt, tail=tuple(tail), n_in=n_in, block_size=block_size, dtype=jnp.dtype(array.dtype).name
    )


# ---- integer formats (qwix) ----


def _int(m, block_size: int, qtype, tiled: bool) -> dict:
    if tiled and m.shape[-1] % block_size:
        raise QuantError(
            f"int4 blocks of {block_size} along the input need an input size divisible by "
            f"{block_size}, got {m.shape[-1]}; use nf4 (any size) or another block_size"
        )
    axes = list(range(m.ndim - 1))  # each row (and stack entry) its own scale
    q = qwix.quantize(m, qtype, channelwise_axes=axes, tiled_axes={m.ndim - 1: block_size} if tiled else None)
    return {"codes": q.qvalue.astype(jnp.int8), "scale": q.scale.astype(jnp.float32)}


def _int_decode(q: QArray, qtype, rows: int, cols: int):
    values = q.codes if q.fmt == "int8" else _unpack(q.codes, rows * cols, signed=True).reshape(*q.lead, rows, cols)
    return qwix.dequantize(qwix.QArray(values.astype(qtype), q.scale))


def _encode_int8(m, block_size):
    return _int(m, block_size, jnp.int8, tiled=False)


def _encode_int4(m, block_size):
    out = _int(m, block_size, jnp.int4, tiled=True)
    return {**out, "codes": _pack(out["codes"].reshape(*m.shape[:-2], -1))}


# ---- NF4 and double quantization (bitsandbytes' layout) ----


def _pack(q):
    """[..., n] 4-bit values (int8/uint8) -> [..., ceil(n / 2)] uint8, the first in the high nibble."""
    if q.shape[-1] % 2:
        q = jnp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, 1)])
    q = (q.astype(jnp.uint8) & 0xF).reshape(*q.shape[:-1], -1, 2)
    return (q[..., 0] << 4) | q[..., 1]


def _unpack(packed, n: int, signed: bool = False):
    """The inverse of _pack: [..., n] uint8 codes (int8, sign-extended, when `signed`)."""
    q = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(*packed.shape[:-1], -1)
    q = q if q.shape[-1] == n else q[..., :n]
    return (q.astype(jnp.int8) ^ 8) - 8 if signed else q


def _blockwise(flat, code: np.ndarray, block: int):
    """Per block of `block` elements of the last axis: absmax, and the index of the code
    value nearest each element scaled by 1 / absmax (ties to the lower value), as
    bitsandbytes' reference implementation: full blocks multiplied by the reciprocal, a
    partial last block divided. (Its CPU and CUDA 8-bit kernels search approximately and
    pick a neighbour of the nearest value for a fraction of a percent of elements.)"""
    n = flat.shape[-1]
    n_blocks, rem = -(-n // block), n % block
    padded = jnp.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, n_blocks * block - n)])
    blocks = padded.reshape(*flat.shape[:-1], n_blocks, block)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)  # [..., blocks]
    safe = jnp.maximum(absmax, np.float32(1e-38))[..., None]
    scaled = blocks * (np.float32(1.0) / safe)
    if rem:
        last = jnp.arange(n_blocks) == n_blocks - 1
        scaled = jnp.where(last[:, None], blocks / safe, scaled)
    index = jnp.searchsorted(jnp.asarray(codes_lib.thresholds(code)), jnp.clip(scaled, -1.0, 1.0), side="left")
    keep = n + n % 2  # an odd count keeps one padded zero: packing pairs it as the reference does
    return index.astype(jnp.uint8).reshape(*flat.shape[:-1], -1)[..., :keep], absmax


def _decode_blockwise(index, absmax, code: np.ndarray, block: int):
    """code[index] * absmax of each element's block, in float32."""
    n, n_blocks = index.shape[-1], absmax.shape[-1]
    values = jnp.asarray(code)[index]
    if n_blocks * block != n:
        values = jnp.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, n_blocks * block - n)])
    out = values.reshape(*values.shape[:-1], n_blocks, block) * absmax[..., None]
    return out.reshape(*values.shape[:-1], -1)


def _encode_nf4(m, block_size, double_quant: bool = False):
    flat = m.reshape(*m.shape[:-2], -1)
    index, absmax = _blockwise(flat, codes_lib.nf4_code(), block_size)
    out = {"codes": _pack(index), "scale": absmax}
    if double_quant:
        offset = jnp.mean(absmax, axis=-1)  # [...]; float32, summed in XLA's order (torch's may differ by an ulp)
        q_absmax, scale2 = _blockwise(absmax - offset[..., None], codes_lib.dynamic_code(), SCALE_BLOCK)
        out.update(scale=q_absmax, scale2=scale2, offset=offset)
    return out


def block_absmax(q: QArray):
    """The per-block absmax of an nf4 / nf4-dq array (decoded from 8 bits for nf4-dq)."""
    if q.fmt == "nf4":
        return q.scale
    n_blocks = q.scale.shape[-1]
    absmax = _decode_blockwise(q.scale, q.scale2, codes_lib.dynamic_code(), SCALE_BLOCK)[..., :n_blocks]
    # two roundings, as the reference's; under jit XLA:CPU may contract them into one
    # fused multiply-add (it drops optimization barriers), an ulp away at most
    return absmax + q.offset[..., None]


def _nf4_decode(q: QArray, rows: int, cols: int):
    index = _unpack(q.codes, rows * cols)
    flat = _decode_blockwise(index, block_absmax(q), codes_lib.nf4_code(), q.block_size)
    return (flat if flat.shape[-1] == rows * cols else flat[..., : rows * cols]).reshape(*q.lead, rows, cols)


_ENCODE = {
    "int8": _encode_int8,
    "int4": _encode_int4,
    "nf4": _encode_nf4,
    "nf4-dq": lambda m, b: _encode_nf4(m, b, double_quant=True),
}
_DECODE = {
    "int8": lambda q, r, c: _int_decode(q, jnp.int8, r, c),
    "int4": lambda q, r, c: _int_decode(q, jnp.int4, r, c),
    "nf4": _nf4_decode,
    "nf4-dq": _nf4_decode,
}
