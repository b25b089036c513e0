"""Checkpoint conversion to and from Hugging Face (MistralForCausalLM, MixtralForCausalLM).

    cfg, params = moe.convert.load_hf(hf_dir)        # in memory
    moe.convert.save_hf(cfg, params, out_dir)
    moe.convert.convert_from_hf(hf_dir, out_dir)     # streaming, to an Orbax checkpoint
    moe.convert.convert_to_hf(ckpt_dir, out_dir)     # streaming, from an Orbax checkpoint
"""

from moe.convert.hf import convert_from_hf, convert_to_hf, load_hf, save_hf
from moe.convert.table import ConversionError

__all__ = ["ConversionError", "convert_from_hf", "convert_to_hf", "load_hf", "save_hf"]
