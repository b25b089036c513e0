"""Running trained or converted models: generation with a KV cache, perplexity, passkey retrieval.

    from moe.infer import generate
    new_ids = generate(cfg, params, prompts, max_new_tokens=64, temperature=0.7, top_p=0.9)

Names load on first use, so `moe --help` does not import JAX.
"""

import importlib

_EXPORTS = {
    "generate": "moe.infer.decode",
    "GenerationError": "moe.infer.decode",
    "Sampling": "moe.infer.sampling",
    "SamplingError": "moe.infer.sampling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moe.infer' has no attribute {name!r}")
