"""What a researcher watches: DIR/metrics.jsonl, TensorBoard events, a progress bar, MFU.

metrics.jsonl holds one JSON object per training step (step, loss, ce_loss, aux_loss,
z_loss, grad_norm, lr, tokens_per_s, mfu, expert_load per layer, expert_imbalance per
layer = max/mean load, ep_overflow = token copies the expert-parallel receive buffers
dropped) and one per evaluation ({"step", "val_loss", "val_ppl"}).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moe import storage

# Dense peak FLOP/s per chip (bfloat16), by jax device_kind prefix.
KNOWN_PEAKS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def measured_matmul_flops(
    dtype=jnp.float32, shape: tuple[int, int, int] = (1024, 1024, 1024), repeats: int = 5
) -> float:
    """FLOP/s of a plain [m, k] @ [k, n] matmul (shape = (m, k, n)) on the default device, measured now."""
    m, k, n = shape
    a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(a, b)
    out.block_until_ready()
    return 2 * m * k * n * repeats / (time.perf_counter() - start)


def peak_flops(dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of all local devices, where the number comes from)."""
    device = jax.devices()[0]
    for prefix, peak in KNOWN_PEAKS.items():
        if device.device_kind.startswith(prefix):
            return peak * jax.device_count(), f"{device.device_kind} spec sheet"
    measured = measured_matmul_flops(jnp.float32 if dtype == "float32" else jnp.bfloat16)
    return measured, f"measured {dtype} matmul on {device.platform}"


def _plain(value):
    array = np.asarray(value)
    if array.ndim == 0:
        return round(float(array), 6) if array.dtype.kind == "f" else int(array)
    return np.round(array.astype(np.float64), 5).tolist()


class MetricsLog:
    """Appends to DIR/metrics.jsonl and TensorBoard; on resume, drops records past `step`."""

    def __init__(self, run_dir: Path | None, resume_step: int, enabled: bool = True):
        self.enabled = enabled  # only the first process writes, in multi-host runs
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", buffering=1)
        from tensorboardX import SummaryWriter  # loads protobuf: only where a run writes events

        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(f"{'val' if key.startswith('val') else 'train'}/{key}", value, step)
            elif key == "expert_load":
                for layer, loads in enumerate(value):
                    for expert, load in enumerate(loads):
                        self.tb.add_scalar(f"expert_load/layer{layer}/expert{expert}", load, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        self.tb.close()


def read(run_dir) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) from DIR/metrics.jsonl (DIR local or gs://)."""
    path = storage.location(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {run_dir} a run directory of `moe train`?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def read_if_any(run_dir) -> tuple[list[dict], list[dict]]:
    """Like read, but ([], []) for a run that has not written metrics yet."""
    try:
        return read(run_dir)
    except FileNotFoundError:
        return [], []


DPO_METRICS = ("dpo_loss", "reward_margin", "reward_accuracy", "logp_chosen", "logp_rejected")


def step_record(step: int, metrics: dict, tokens: float, seconds: float, flops_per_token: float, peak: float) -> dict:
    """One step's JSON record from the step's device metrics (already on the host)."""
    tokens_per_s = tokens / max(seconds, 1e-9)
    record = {
        "step": step,
        **{k: metrics[k] for k in ("loss", "ce_loss", "aux_loss", "z_loss", "grad_norm", "lr")},
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token / peak,
        "skipped_steps": metrics["nonfinite_total"],
    }
    record.update({k: metrics[k] for k in DPO_METRICS if k in metrics})
    if "ep_overflow" in metrics:  # token copies expert parallelism's receive buffers dropped (summed over layers)
        record["ep_overflow"] = metrics["ep_overflow"]
    if "expert_load" in metrics:
        load = np.asarray(metrics["expert_load"])  # [layers, experts], each row sums to 1
        record["expert_load"] = load
        record["expert_imbalance"] = load.max(-1) / np.maximum(load.mean(-1), 1e-12)
    return record
