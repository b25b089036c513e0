"""Peak host memory (RSS) of `moe convert` in both directions on a synthetic checkpoint.

    python benchmarks/convert_memory.py [--work-dir DIR] [--layers 8]

Writes a random Mixtral-shaped Hugging Face checkpoint (float32, over 2 GB by default,
sharded), converts it to our format and back with the `moe` command in child processes,
and prints each child's peak RSS beside the checkpoint size and the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moe.config import ModelConfig
from moe.convert.hf import ShardedWriter, shard_plan
from moe.convert.table import entries, hf_config_from_model


def synthetic_config(layers: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=32000,
        d_model=1024,
        n_layers=layers,
        n_heads=8,
        n_kv_heads=2,
        d_ff=3584,
        n_experts=8,
        top_k=2,
        rope_theta=1e6,
        max_seq_len=4096,
    )


def write_synthetic_hf(cfg: ModelConfig, out: Path, shard_size: int) -> tuple[int, int]:
    """A random checkpoint written one tensor at a time. Returns (total bytes, largest tensor)."""
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(out, shard_plan(cfg, "float32", shard_size))
    rng = np.random.default_rng(0)
    largest = 0
    for e in entries(cfg):
        tensor = rng.standard_normal(e.rule.hf_shape(cfg), dtype=np.float32) * 0.02
        largest = max(largest, tensor.nbytes)
        writer.add(e.hf_name, tensor)
    writer.finish()
    (out / "config.json").write_text(json.dumps(hf_config_from_model(cfg, "float32")))
    return writer.total_size, largest


def peak_rss_of(command: list[str]) -> tuple[float, int]:
    """Run a child process; return (seconds, its peak RSS in bytes)."""
    start = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed with status {status}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shard-size", default="500MB")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="moe-convert-mem-"))
    cfg = synthetic_config(args.layers)
    total, largest = write_synthetic_hf(cfg, work / "hf", 500 * 10**6)
    moe = [sys.executable, "-m", "moe", "convert"]
    baseline = peak_rss_of([sys.executable, "-c", "import moe.convert, moe.model"])[1]
    t_from, rss_from = peak_rss_of(moe + ["from-hf", str(work / "hf"), str(work / "ckpt")])
    t_to, rss_to = peak_rss_of(
        moe + ["to-hf", str(work / "ckpt"), str(work / "back"), "--max-shard-size", args.shard_size]
    )
    gb = 1e9
    print(
        f"checkpoint: {total / gb:.2f} GB float32, largest tensor {largest / 1e6:.0f} MB, "
        f"output shards {args.shard_size}"
    )
    print(f"python + jax + moe imported:   peak RSS {baseline / gb:.2f} GB")
    print(
        f"moe convert from-hf: {t_from:6.1f} s, peak RSS {rss_from / gb:.2f} GB "
        f"({rss_from / total:.0%} of the checkpoint)"
    )
    print(f"moe convert to-hf:   {t_to:6.1f} s, peak RSS {rss_to / gb:.2f} GB ({rss_to / total:.0%} of the checkpoint)")
    if args.work_dir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
