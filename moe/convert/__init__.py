"""Checkpoint conversion to and from Hugging Face (MistralForCausalLM, MixtralForCausalLM),
and sparse upcycling of a dense checkpoint into an MoE (upcycle.py).

    cfg, params = moe.convert.load_hf(hf_dir)        # in memory
    moe.convert.save_hf(cfg, params, out_dir)
    moe.convert.convert_from_hf(hf_dir, out_dir)     # streaming, to an Orbax checkpoint
    moe.convert.convert_to_hf(ckpt_dir, out_dir)     # streaming, from an Orbax checkpoint

Names load on first use, so `moe --help` does not import JAX.
"""

import importlib

_EXPORTS = {
    "ConversionError": "moe.convert.table",
    **{name: "moe.convert.hf" for name in ("convert_from_hf", "convert_to_hf", "load_hf", "save_hf")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moe.convert' has no attribute {name!r}")
