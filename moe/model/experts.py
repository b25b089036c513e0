"""One MoE layer's expert weights held as separate buffers, one per expert (decoding on CPU).

The parameter tree stacks a layer's experts, w1: [experts, d_model, d_ff]. To multiply a
token by its chosen expert, XLA:CPU copies that expert's matrix out of the stack first (a
slice never feeds a dot in place): at batch 1 the copies took longer than the products
(bench-moe decode profile, docs/inference.md). With each expert in its own buffer, the
gather dispatch picks the expert with lax.switch and multiplies by its buffer as it is.
moe/infer/layout.py builds these from the stacked tree without copying (views of the same
memory on CPU).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class ExpertList:
    experts: tuple  # [experts] x [in, out]
    dtype: Optional[str] = struct.field(pytree_node=False, default=None)  # compute dtype; None: as stored

    @property
    def shape(self) -> tuple:
        return (len(self.experts), *self.experts[0].shape)

    def astype(self, dtype) -> ExpertList:
        """Cast lazily: only the experts a token is routed to are cast, when they are used."""
        return self.replace(dtype=jnp.dtype(dtype).name)

    def matrix(self, e: int):
        """Expert e's matrix [in, out] in the compute dtype."""
        w = self.experts[e]
        return w if self.dtype is None else w.astype(self.dtype)


def switch_experts(fn, expert_idx, x, *weights: ExpertList):
    """fn(x, *matrices of expert `expert_idx` (a traced scalar)), with lax.switch: one
    branch per expert, each reading its own buffers."""
    n_experts = weights[0].shape[0]
    branches = [lambda x, e=e: fn(x, *(w.matrix(e) for w in weights)) for e in range(n_experts)]
    return jax.lax.switch(expert_idx, branches, x)
