"""Weight-only quantization (int8, int4, NF4, NF4 with double quantization) of the params
pytree: moe/quant/qarray.py is the format, moe/quant/params.py which weights and how many
bytes, moe/quant/commands.py `moe quantize`."""

from moe.quant.qarray import FORMATS, QArray, QuantError, as_array, quantize

__all__ = ["FORMATS", "QArray", "QuantError", "as_array", "quantize"]
