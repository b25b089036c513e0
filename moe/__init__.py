"""moe: dense and sparse mixture-of-experts decoders (Mistral, Mixtral) in JAX/Flax."""

__version__ = "0.1.0"
