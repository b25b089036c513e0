"""One token's expert products at decode: the chosen experts' matrices read out of the
stacked [layers, experts, d_model, d_ff] parameter inside a scan over layers (what the
decode loop did before moe/infer/layout.py: XLA CPU copies each slice before the dot)
against the same matrices held as separate buffers and picked by lax.switch (no slice
feeds a dot; what the decode loop does now on CPU). bench-moe's shapes, top-2, all 8
layers. Results on the 2-core CPU machine: docs/inference.md, "Decode speed".

    python benchmarks/decode_expert_weights.py
"""

import jax
import jax.numpy as jnp
import numpy as np

from moe.bench.training import _time
from moe.model.experts import ExpertList, switch_experts

LAYERS, EXPERTS, D_MODEL, D_FF, TOP_K = 8, 8, 512, 1792, 2


def main() -> None:
    keys = jax.random.split(jax.random.key(0), 2)
    stacked = jax.random.normal(keys[0], (LAYERS, EXPERTS, D_MODEL, D_FF))  # [layers, experts, d, f]
    separate = [ExpertList(tuple(stacked[layer, e] + 0 for e in range(EXPERTS))) for layer in range(LAYERS)]
    x = jax.random.normal(keys[1], (1, D_MODEL))
    chosen = jnp.asarray([[3, 5]] * LAYERS)  # [layers, top_k]
    pairs = [(layer, k) for layer in range(LAYERS) for k in range(TOP_K)]

    def from_stack(x, w, idx):  # as the model decodes: a scan over layers, the chosen experts gathered
        def layer(total, xs):
            w_edf, idx_k = xs
            return total + sum(x @ w_edf[idx_k[k]] for k in range(TOP_K)), None

        return jax.lax.scan(layer, jnp.zeros((1, D_FF)), (w, idx))[0]

    from_stack = jax.jit(from_stack)
    by_switch = jax.jit(
        lambda x, ws, idx: sum(  # as the decode loop does on CPU (moe/model/experts.py)
            switch_experts(jnp.matmul, idx[layer, k], x, ws[layer]) for layer, k in pairs
        )
    )
    np.testing.assert_allclose(
        np.asarray(by_switch(x, separate, chosen)), np.asarray(from_stack(x, stacked, chosen)), rtol=1e-5, atol=1e-4
    )  # the same sums, added in another order
    a, b = (1e3 * _time(fn, x, w, chosen, repeats=300) for fn, w in ((from_stack, stacked), (by_switch, separate)))
    print(
        f"{len(pairs)} expert matrices of [{D_MODEL}, {D_FF}] float32 for one token (backend {jax.default_backend()}):"
    )
    print(f"  sliced from the stacked parameter: {a:.2f} ms")
    print(f"  separate buffers, lax.switch:      {b:.2f} ms  ({a / b:.1f}x faster)")


if __name__ == "__main__":
    main()
