"""A 32k-token prompt through tiny-moe's prefill (chunked: no [seq, seq] scores, no
[seq, vocab] logits) and a few decode steps; prints the time and the peak RSS.

    python benchmarks/long_prefill.py [--tokens 32768]
"""

import argparse
import dataclasses
import resource
import time
from pathlib import Path

import jax
import numpy as np

import moe.model as M
from moe import config as config_lib
from moe.infer import generate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--new", type=int, default=8)
    args = parser.parse_args()
    cfg = config_lib.load(ROOT / "configs/tiny-moe.yaml").model
    cfg = dataclasses.replace(cfg, max_seq_len=args.tokens + args.new)
    params = M.init(cfg, jax.random.key(0))
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, args.tokens).tolist()
    start = time.perf_counter()
    out = generate(cfg, params, [prompt], args.new)[0]
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"tiny-moe: {args.tokens}-token prompt + {len(out)} new tokens in {seconds:.1f} s "
        f"(compile included) on {jax.devices()[0].device_kind}; peak RSS {rss:.2f} GiB"
    )


if __name__ == "__main__":
    main()
