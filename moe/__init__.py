"""moe: dense and sparse mixture-of-experts decoders (Mistral, Mixtral) in JAX/Flax.

Importing the package keeps JAX from starting libtpu on a host without TPU chips (where it
only prints initialization errors) unless JAX_PLATFORMS says otherwise: moe/platform.py.
"""

from moe import platform as _platform

__version__ = "0.1.0"

_platform.quiet_without_tpu()
