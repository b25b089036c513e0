"""moe: dense and sparse mixture-of-experts decoders (Mistral, Mixtral) in JAX/Flax.

Importing the package keeps JAX from starting libtpu on a host without TPU chips (where it
only prints initialization errors) unless JAX_PLATFORMS says otherwise: moe/platform.py.
"""

import sys

from moe import platform as _platform

__version__ = "0.1.0"

if (_platforms := _platform.quiet_without_tpu()) and "jax" in sys.modules:
    # JAX, imported first (by flax, say), read JAX_PLATFORMS already; its backends start later
    sys.modules["jax"].config.update("jax_platforms", _platforms)
