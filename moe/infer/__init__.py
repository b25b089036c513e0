"""Running trained or converted models: generation with a KV cache, perplexity, passkey retrieval.

    from moe.infer import generate
    new_ids = generate(cfg, params, prompts, max_new_tokens=64, temperature=0.7, top_p=0.9)
"""

from moe.infer.generate import GenerationError, generate
from moe.infer.sampling import Sampling, SamplingError

__all__ = ["GenerationError", "Sampling", "SamplingError", "generate"]
