"""Weight-only quantization (int8, int4, NF4, NF4 with double quantization) of the params
pytree. The format, `QArray`, is the model's own (moe/model/qarray.py: the model computes
with it); here: which weights and how many bytes (params.py), quantized checkpoints and
`moe quantize`'s streamed writing (store.py), the command (commands.py).

    from moe.quant import quantize, QArray
    q = quantize(w, "nf4-dq")

Names load on first use, so `moe --help` does not import JAX.
"""

import importlib

_EXPORTS = {name: "moe.model.qarray" for name in ("FORMATS", "QArray", "QuantError", "as_array", "quantize")}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moe.quant' has no attribute {name!r}")
