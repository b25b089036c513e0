"""The code books of the 4-bit and 8-bit formats, bit-compatible with bitsandbytes.

NF4 (Dettmers et al. 2023, "QLoRA", appendix E): 16 values in [-1, 1], quantiles of a
standard normal normalized to absmax 1, with an exact zero. We take them from Google's qwix
(which lists the paper's table); tests check them against the paper and bitsandbytes.

The signed dynamic 8-bit code (Dettmers 2015, "8-Bit Approximations for Parallelism in Deep
Learning"): what bitsandbytes quantizes the NF4 block scales with under double
quantization. qwix has no such type, so it is built here from its definition: for each
decade 10^-6 .. 10^0 (the exponent), 2^i linearly spaced fractions (i = 0 .. 6, the
fraction bits the exponent leaves), each the midpoint of a bin of linspace(0.1, 1, 2^i + 1),
with both signs; then 0 and 1. 2 * 127 + 2 = 256 values, sorted.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

NF4_VALUES = 16
DYNAMIC_EXPONENT_BITS = 7


@functools.cache
def nf4_code() -> np.ndarray:
    """The 16 NF4 values, ascending, float32 (code index = position)."""
    from qwix._src.core import numerics  # qwix keeps its NF4 table beside its (private) numerics

    with jax.ensure_compile_time_eval():  # a constant, even when first asked for inside a trace
        code = np.asarray(numerics.get_nf4_buckets(), np.float32)
    assert code.shape == (NF4_VALUES,) and np.all(np.diff(code) > 0), code
    return code


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    """float32 linspace as the reference computes it (torch on CPU): a float32 step, the
    first half stepped from the start and the second back from the end, each point with
    one rounding (a fused multiply-add; exact here in float64, then rounded once)."""
    start32, stop32 = np.float32(start), np.float32(stop)
    step = np.float64(np.float32((stop32 - start32) / np.float32(num - 1)))
    i = np.arange(num, dtype=np.float64)
    front = np.float64(start32) + step * i
    back = np.float64(stop32) - step * (num - 1 - i)
    return np.where(i < num // 2, front, back).astype(np.float32)


@functools.cache
def dynamic_code() -> np.ndarray:
    """The signed dynamic 8-bit code: 256 float32 values, ascending."""
    values = [0.0, 1.0]
    for i in range(DYNAMIC_EXPONENT_BITS):
        edges = _linspace_f32(0.1, 1.0, 2**i + 1)
        mids = (edges[:-1] + edges[1:]) / np.float32(2.0)  # float32, as the reference
        decade = 10.0 ** (i - (DYNAMIC_EXPONENT_BITS - 1))
        magnitudes = (mids * np.float32(decade)).astype(np.float32)
        values += [float(m) for m in magnitudes] + [-float(m) for m in magnitudes]
    code = np.sort(np.asarray(values, np.float32))
    assert code.shape == (256,), code.shape
    return code


def thresholds(code: np.ndarray) -> np.ndarray:
    """Midpoints between neighbouring code values: a scaled value v gets the code index
    i with thresholds[i - 1] < v <= thresholds[i] (ties go to the lower value), as the
    reference's bucketize does."""
    return ((code[:-1] + code[1:]) / np.float32(2.0)).astype(np.float32)
