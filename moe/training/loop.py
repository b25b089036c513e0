"""`moe train`: one linear loop. Setup, data, state (fresh or resumed), compile, steps, finish.

A run directory (local, or gs://BUCKET/PATH: moe/storage.py) holds config.yaml (the
resolved config), train.log, metrics.jsonl, tensorboard/ and checkpoints/<step>/. Calling
`moe train` again with the same directory resumes from the newest readable checkpoint, with
the data iterator where it was.
SIGTERM or SIGINT (TPU preemption, Ctrl-C) saves a checkpoint and returns normally.

Fault injection: with MOE_FAULT_SIGKILL_AT_STEP=N in the environment, the run waits for
its pending checkpoint saves after step N and then SIGKILLs itself: a preempted host at a
known step, so that resume tests are exact and never depend on timing. With
MOE_FAULT_COMPILE_DELAY_S=T a process of a multi-host run waits T seconds before compiling:
a slow host.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import zlib

import jax
import numpy as np
import yaml

from moe import config as config_lib
from moe import progress as progress_lib
from moe import storage
from moe.checkpoint.runs import RunCheckpoints
from moe.config import Config
from moe.data import pipeline as data_lib
from moe.model import param_shapes
from moe.model.params import count_params
from moe.parallel import mesh as mesh_lib
from moe.quant import params as quant_params
from moe.training import init_from as init_from_lib
from moe.training import metrics as metrics_lib
from moe.training import state as state_lib
from moe.training import step as train_lib
from moe.training import trainable as trainable_lib

log = logging.getLogger("moe.training")


class TrainingError(RuntimeError):
    """The run cannot go on; a checkpoint was saved first where that was possible."""


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks after every step."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _setup_run_dir(cfg: Config, run_dir, staging: storage.Staging | None) -> logging.Handler | None:
    """Refuse a run directory of another model; then (process 0 only, `staging` given) write
    config.yaml and start train.log. Returns the log handler to close at the end."""
    saved = run_dir / "config.yaml"
    if saved.exists():
        previous = yaml.safe_load(saved.read_text()) or {}
        if previous.get("model") != config_lib.to_dict(cfg)["model"]:
            raise TrainingError(
                f"{run_dir} holds a run of a different model (see {saved}); "
                "resume with the same model config or use a new --run-dir"
            )
    log.setLevel(logging.DEBUG)  # the console shows INFO unless `moe train --verbose`; train.log all
    if staging is None:  # another process writes the shared files
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(config_lib.dump(cfg))
    handler = logging.FileHandler(staging.local / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.info("%s; config saved to %s", _summary(cfg), saved)
    log.debug("resolved config:\n%s", config_lib.dump(cfg))
    return handler


def _summary(cfg: Config) -> str:
    m, t = cfg.model, cfg.train
    experts = f"{m.n_experts} experts, top-{m.top_k}" if m.is_moe else "dense"
    return (
        f"model: {m.n_layers} layers, d_model {m.d_model}, {experts}, vocab {m.vocab_size}; "
        f"train: {t.steps} steps of {t.batch_size} x {t.seq_len} tokens, lr {t.lr}"
    )


def _base_params(cfg: Config, mesh):
    """The params of train.init_from on the mesh (the base model's, no adapters), or None."""
    if cfg.train.init_from is None:
        return None
    shapes = param_shapes(cfg.model)
    target = state_lib.with_shardings(shapes, state_lib.like_params(cfg, mesh, shapes))
    log.info("reading the starting weights from %s", cfg.train.init_from)
    return init_from_lib.load(cfg, target)


def _start(cfg: Config, mesh, shardings, base):
    """Step 0: random weights, or init_from's (with fresh adapters for LoRA)."""
    if base is None:
        log.info("starting from step 0 with random weights")
        return jax.jit(lambda r: train_lib.fresh_state(cfg, r), out_shardings=shardings)(jax.random.key(cfg.seed))
    log.info("starting from step 0 with the weights of %s", cfg.train.init_from)
    if cfg.lora.rank is not None:
        adapters = jax.jit(
            lambda r: trainable_lib.split(cfg, train_lib.fresh_params(cfg, r))[0], out_shardings=shardings.params
        )(jax.random.key(cfg.seed))
        base = trainable_lib.combine(cfg, adapters, base)
    trainable, frozen = trainable_lib.split(cfg, base)
    trainable = quant_params.dequantize_params(trainable)  # a router trained over a quantized source
    if frozen:  # own buffers: the train step donates the state, and jit may forward its inputs as outputs
        trainable = jax.tree_util.tree_map(lambda x: x.copy(), trainable)
    return jax.jit(lambda t: train_lib.state_from(cfg, t), out_shardings=shardings)(trainable)


def _initial_state(cfg: Config, checkpoints: RunCheckpoints, mesh):
    """(state, state shardings, frozen params, their shardings, data iterator state or
    None): the newest readable checkpoint, or step 0, laid out on the mesh. A run that
    started from init_from resumes from its own checkpoints; it reads the source again only
    for what stays frozen (a LoRA base, DPO's reference)."""
    target, shardings = state_lib.abstract_state(cfg, mesh)
    restored = checkpoints.restore_latest(target.params, target.opt_state)
    keeps_base = cfg.lora.rank is not None or cfg.train.objective == "dpo"
    base = _base_params(cfg, mesh) if restored is None or keeps_base else None
    frozen = trainable_lib.split(cfg, base)[1] if keeps_base else {}
    if cfg.quant.base is not None and frozen:  # QLoRA: the frozen base held quantized
        q = cfg.quant
        frozen = quant_params.quantize_params(frozen, q.base, q.include, q.exclude, q.block_size)
        log.info("the frozen base is held in %s: %.1f MB", q.base, quant_params.nbytes(frozen) / 1e6)
    frozen_shardings = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
    if restored is None:
        return _start(cfg, mesh, shardings, base), shardings, frozen, frozen_shardings, None
    step, params, opt_state, data_state, meta = restored
    log.info("resumed from the checkpoint at step %d", step)
    step_array = jax.device_put(np.int32(meta["step"]), shardings.step)
    state = train_lib.TrainState(step_array, params, opt_state)
    return state, shardings, frozen, frozen_shardings, data_state


def _on_mesh(batch: dict, sharding) -> dict:
    """The global batch (the same on every process) as arrays split over the mesh."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index]) for k, v in batch.items()}


def _evaluate(eval_fn, params, frozen, batches) -> dict:
    ce, tokens = 0.0, 0.0
    for batch in batches:
        out = jax.device_get(eval_fn(params, batch, frozen))
        ce, tokens = ce + float(out["ce_sum"]), tokens + float(out["n_tokens"])
    val_loss = ce / max(tokens, 1.0)
    return {"val_loss": val_loss, "val_ppl": float(np.exp(min(val_loss, 80.0)))}


def _compile_in_every_process(train_step, eval_step, state, batch, frozen, val_set) -> None:
    """Multi-host: compile both steps (jit caches the programs) and wait until every process
    has, so that all enter the first step's collectives together (compile times differ
    between hosts; CPU collectives give up on a peer that is 30 s late). Alone: nothing, the
    first call compiles."""
    if jax.process_count() == 1:
        return
    start = time.perf_counter()
    time.sleep(float(os.environ.get("MOE_FAULT_COMPILE_DELAY_S", "0")))
    train_step.lower(state, batch, frozen).compile()
    if val_set:
        eval_step.lower(state.params, val_set[0], frozen).compile()
    mesh_lib.wait_for_all_processes("compiled")
    log.info("compiled the steps and met the other processes in %.1f s", time.perf_counter() - start)


def run(cfg: Config, run_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Train to cfg.train.steps (or until stopped); returns the last step's record."""
    # --- setup: processes, mesh, run directory, data
    mesh_lib.initialize_distributed(cfg)
    mesh = mesh_lib.make_mesh(cfg)  # refuses layouts that do not divide, before compiling
    train_docs, val_docs = data_lib.check(cfg)  # bad data or a bad init_from: refused before
    init_from_lib.check(cfg)  # anything is written
    run_dir = storage.location(run_dir)
    with _shared_files(cfg, run_dir) as staging:
        return _train(cfg, mesh, train_docs, val_docs, run_dir, staging, progress)


@contextlib.contextmanager
def _shared_files(cfg: Config, run_dir):
    """Process 0's staging of train.log and metrics (None in other processes), synced up and
    closed however the run ends."""
    staging = storage.Staging(run_dir, fetch=("metrics.jsonl", "train.log")) if jax.process_index() == 0 else None
    handler = None
    try:
        handler = _setup_run_dir(cfg, run_dir, staging)
        yield staging
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        if staging is not None:
            staging.close()


def _train(cfg: Config, mesh, train_docs, val_docs, run_dir, staging, progress: bool) -> dict:
    writer = staging is not None
    log.info(
        "mesh %s over %d devices in %d processes; GLIBC_TUNABLES=%s",
        dict(mesh.shape),
        mesh.size,
        jax.process_count(),
        os.environ.get("GLIBC_TUNABLES", "unset"),
    )  # moe/platform.py's malloc choice
    log.info("data: %d training and %d validation documents", len(train_docs), len(val_docs))
    if data_lib.is_chat(cfg.data):
        log.info(
            "data: %d rows truncated (oldest turns dropped) and %d left out to fit train.seq_len=%d",
            train_docs.truncated + val_docs.truncated,
            train_docs.dropped + val_docs.dropped,
            cfg.train.seq_len,
        )
    checkpoints = RunCheckpoints(run_dir / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save)

    # --- state and data, fresh or resumed
    with jax.set_mesh(mesh):
        state, state_sharding, frozen, frozen_sharding, data_state = _initial_state(cfg, checkpoints, mesh)
    start = int(jax.device_get(state.step))
    batches = data_lib.train_iterator(cfg, train_docs)
    if data_state is not None:
        data_lib.restore(batches, data_state)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    val_set = [_on_mesh(b, batch_sharding) for b in data_lib.val_batches(cfg, val_docs)]

    # --- compile
    optimizer = train_lib.make_optimizer(cfg, state.params)
    train_step, eval_step = train_lib.jit_steps(cfg, optimizer, mesh, state_sharding, frozen_sharding)
    flops_per_token = train_lib.flops_per_token(cfg, count_params(cfg.model).active)
    peak, peak_source = metrics_lib.peak_flops(cfg.model.dtype)
    log.info("MFU against %.3g FLOP/s (%s); %.4g FLOPs per token", peak, peak_source, flops_per_token)

    # --- steps
    metrics_log = metrics_lib.MetricsLog(staging.local if writer else None, start, enabled=writer)
    bar = progress_lib.bar(desc="train", total=cfg.train.steps, initial=start, unit="step", show=progress, leave=True)
    record, last_saved = {}, start
    kill_at = int(os.environ.get("MOE_FAULT_SIGKILL_AT_STEP", "0"))

    def save(step):
        if writer:
            staging.sync()  # the records up to this step are stored before its checkpoint exists
        meta = {"step": step, "config": config_lib.to_dict(cfg)}
        checkpoints.save(step, state.params, state.opt_state, batches.get_state(), meta)
        return step

    try:
        with StopRequest() as stop, jax.set_mesh(mesh):
            for step in range(start + 1, cfg.train.steps + 1):
                batch = next(batches)
                sharded = _on_mesh(batch, batch_sharding)
                if step == start + 1:
                    _compile_in_every_process(train_step, eval_step, state, sharded, frozen, val_set)
                t0 = time.perf_counter()
                state, metrics = train_step(state, sharded, frozen)
                metrics = jax.device_get(metrics)
                tokens = float(np.sum(batch["loss_mask"] if "loss_mask" in batch else batch["segment_ids"] != 0))
                record = metrics_lib.step_record(step, metrics, tokens, time.perf_counter() - t0, flops_per_token, peak)
                record["batch_crc32"] = zlib.crc32(np.ascontiguousarray(batch["inputs"]).tobytes())
                metrics_log.write(record)
                if record.get("ep_overflow", 0) > 0:
                    log.warning(
                        "step %d: %d token copies did not fit the expert-parallel receive buffers and "
                        "added 0 (raise model.ep_buffer_factor, or null for the worst case)",
                        step,
                        record["ep_overflow"],
                    )
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                    val = _evaluate(eval_step, state.params, frozen, val_set)
                    metrics_log.write({"step": step, **val})
                    log.info(
                        "step %d: loss %.4f, val_loss %.4f, val_ppl %.2f",
                        step,
                        record["loss"],
                        val["val_loss"],
                        val["val_ppl"],
                    )
                    if writer:
                        staging.sync()
                elif writer:
                    staging.sync(force=False)
                if metrics["nonfinite_consecutive"] >= cfg.train.max_nonfinite_steps:
                    last_saved = save(step)
                    raise TrainingError(
                        f"{int(metrics['nonfinite_consecutive'])} steps in a row had non-finite gradients "
                        f"(up to step {step}); a checkpoint was saved. Lower train.lr, raise "
                        "train.warmup_steps or check the data, then resume."
                    )
                if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.steps:
                    last_saved = save(step)
                if step == kill_at:
                    checkpoints.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop.signal_name:
                    if last_saved != step:
                        last_saved = save(step)
                    log.info("%s received: saved step %d and stopped", stop.signal_name, step)
                    break
    finally:
        bar.close()
        checkpoints.close()
        metrics_log.close()
        _close_data(batches)
    return record


def _close_data(batches, timeout_s: float = 60.0) -> None:
    """Stop the data pipeline's worker processes, waiting at most timeout_s. Grain 0.2's
    close can block forever reading a message its prefetch process left half-written
    when it exited (seen after runs of 8192-token rows); by then every step and checkpoint
    is stored, so the run logs it and ends instead of hanging."""
    if not hasattr(batches, "close"):
        return
    closing = threading.Thread(target=batches.close, name="close-data", daemon=True)
    closing.start()
    closing.join(timeout_s)
    if closing.is_alive():
        log.warning("the data pipeline did not stop within %.0f s; ending without waiting for it", timeout_s)
