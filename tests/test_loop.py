"""End-to-end `moe train` runs in subprocesses: resume, kills, signals, damaged checkpoints."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from moe import platform, storage
from moe.checkpoint.params import restore_params

from helpers import ROOT, kill_group, processes_with_env, spawn

pytestmark = pytest.mark.slow  # every test here runs `moe train` end to end

SMALL = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.d_ff=64",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.warmup_steps=2",
    "train.eval_every=4",
    "train.eval_batches=1",
    "checkpoint.keep=5",
]


def moe_train(run_dir, *overrides, wait=True, env=None):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **(env or {})}
    command = [
        sys.executable,
        "-m",
        "moe",
        "train",
        str(ROOT / "configs/tiny-moe.yaml"),
        "--run-dir",
        str(run_dir),
        "--no-progress",
        *SMALL,
        *overrides,
    ]
    if not wait:
        return spawn(command, Path(f"{run_dir}.out"), env)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def children():
    """Processes a test starts; each one's whole process group is killed when the test ends."""
    started = []
    yield started
    for child in started:
        kill_group(child)


def read_checkpoint(run_dir, step, item):
    """A checkpoint item (params, opt_state) as NumPy leaves, in tree order."""
    import jax

    return jax.tree_util.tree_leaves(restore_params(Path(run_dir) / "checkpoints" / str(step) / item))


def records(run_dir):  # local or gs://
    lines = (storage.location(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if "loss" in json.loads(line)]


def checkpoint_steps(run_dir):
    folder = storage.location(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def wait_for(condition, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise TimeoutError("the training run did not get there in time")


def test_sigkill_after_checkpoint_then_resume_is_exact(tmp_path, children):
    n = 4
    # with auxiliary-loss-free balancing: the experts' bias moves after every step, outside the optimizer
    common = [f"train.steps={2 * n}", f"checkpoint.every_steps={n}", "data.workers=2", "model.balance=bias"]
    full = moe_train(tmp_path / "full", *common)
    assert full.returncode == 0, full.stdout + full.stderr
    assert "leaked" not in full.stderr  # grain's workers leave no shared memory (or semaphore) behind
    lines = full.stderr.splitlines()  # a one-line config summary; the whole config in train.log only
    assert next(i for i, line in enumerate(lines) if "step " in line and "loss" in line) <= 25, full.stderr
    assert "resolved config" not in full.stderr and "resolved config" in (tmp_path / "full" / "train.log").read_text()
    # on a CPU host with glibc >= 2.35 the command re-ran itself with huge-page malloc (moe/platform.py)
    reran = platform.hugepage_malloc_env(dict(os.environ, JAX_PLATFORMS="cpu"))
    tunables = reran["GLIBC_TUNABLES"] if reran else os.environ.get("GLIBC_TUNABLES", "unset")
    assert f"GLIBC_TUNABLES={tunables}" in full.stdout + full.stderr

    # killed at a known step: after step n + 1, with the checkpoint of step n written
    marker = f"{tmp_path}"
    child = moe_train(
        tmp_path / "killed",
        *common,
        wait=False,
        env={"MOE_FAULT_SIGKILL_AT_STEP": str(n + 1), "MOE_TEST_KILLED_RUN": marker},
    )
    children.append(child)
    assert child.wait(timeout=600) == -signal.SIGKILL, Path(f"{tmp_path / 'killed'}.out").read_text()
    assert [r["step"] for r in records(tmp_path / "killed")] == list(range(1, n + 2))
    assert checkpoint_steps(tmp_path / "killed") == [n]
    # its Grain workers die with it (they would live on as orphans)
    deadline = time.time() + 10
    while processes_with_env("MOE_TEST_KILLED_RUN", marker) and time.time() < deadline:
        time.sleep(0.1)
    assert processes_with_env("MOE_TEST_KILLED_RUN", marker) == []

    resumed = moe_train(tmp_path / "killed", *common)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from the checkpoint at step {n}" in resumed.stdout + resumed.stderr
    a, b = records(tmp_path / "full"), records(tmp_path / "killed")
    assert [r["step"] for r in b] == list(range(1, 2 * n + 1))  # the record of the lost step n+1 replaced
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # as logged
    assert [r["batch_crc32"] for r in a] == [r["batch_crc32"] for r in b]  # the same batches
    for item in ("params", "opt_state"):  # the final state, bit for bit
        want, got = read_checkpoint(tmp_path / "full", 2 * n, item), read_checkpoint(tmp_path / "killed", 2 * n, item)
        assert len(want) == len(got) > 0
        for x, y in zip(want, got):
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), item
    bias = restore_params(tmp_path / "killed" / "checkpoints" / str(2 * n) / "params")["layers"]["moe"]["bias"]
    assert np.abs(np.asarray(bias)).max() > 0  # the bias moved, and resumed bit for bit above


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_a_checkpoint_and_exits_zero(tmp_path, children, sig):
    child = moe_train(tmp_path / "run", "train.steps=1000", "checkpoint.every_steps=1000", "data.workers=2", wait=False)
    children.append(child)
    wait_for(lambda: (tmp_path / "run" / "metrics.jsonl").exists() and len(records(tmp_path / "run")) >= 2)
    child.send_signal(sig)
    assert child.wait(timeout=300) == 0, Path(f"{tmp_path / 'run'}.out").read_text()
    steps = checkpoint_steps(tmp_path / "run")
    assert len(steps) == 1 and 2 <= steps[0] < 1000
    assert steps[0] == records(tmp_path / "run")[-1]["step"]  # the step it stopped at
    assert f"{sig.name} received" in (tmp_path / "run" / "train.log").read_text()
    assert "leaked" not in Path(f"{tmp_path / 'run'}.out").read_text()  # stopped with batches in flight


def test_non_finite_steps_in_a_row_save_a_checkpoint_and_stop_with_exit_1(tmp_path):
    # lr 1e38: the first update sends the weights to ~1e38, every later gradient is NaN
    result = moe_train(
        tmp_path / "run",
        "train.steps=50",
        "train.lr=1e38",
        "train.warmup_steps=0",
        "train.max_nonfinite_steps=3",
        "checkpoint.every_steps=100",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 steps in a row had non-finite gradients (up to step 4); a checkpoint was saved" in result.stderr
    assert checkpoint_steps(tmp_path / "run") == [4]
    skipped = [r["skipped_steps"] for r in records(tmp_path / "run")]
    assert skipped == [0, 1, 2, 3]


def test_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    run = tmp_path / "run"
    first = moe_train(run, "train.steps=4", "checkpoint.every_steps=2", "checkpoint.async_save=false")
    assert first.returncode == 0, first.stdout + first.stderr
    assert checkpoint_steps(run) == [2, 4]
    for f in (run / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file() and f.name not in ("_CHECKPOINT_METADATA", "commit_success.txt"):
            f.write_bytes(b"damaged")
    # a save interrupted by a kill leaves only a temporary folder, which is ignored
    (run / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()
    second = moe_train(run, "train.steps=6", "checkpoint.every_steps=2")
    assert second.returncode == 0, second.stdout + second.stderr
    output = second.stdout + second.stderr
    assert "checkpoint at step 4 cannot be restored" in output and "falling back" in output
    assert "resumed from the checkpoint at step 2" in output
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4, 5, 6]


def test_a_changed_model_is_refused_in_an_existing_run_dir(tmp_path):
    first = moe_train(tmp_path / "run", "train.steps=1")
    assert first.returncode == 0, first.stdout + first.stderr
    second = moe_train(tmp_path / "run", "train.steps=2", "model.n_layers=3")
    assert second.returncode == 1 and "holds a run of a different model" in second.stderr


def test_train_then_plot_and_convert_to_hf(tmp_path):
    run = tmp_path / "run"
    result = moe_train(run, "train.steps=4", "checkpoint.every_steps=4")
    assert result.returncode == 0, result.stdout + result.stderr
    rec = records(run)[-1]
    for key in (
        "step",
        "loss",
        "ce_loss",
        "aux_loss",
        "z_loss",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "mfu",
        "expert_load",
        "expert_imbalance",
    ):
        assert key in rec
    assert len(rec["expert_load"]) == 2 and abs(sum(rec["expert_load"][0]) - 1) < 1e-4
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    plot = subprocess.run([sys.executable, "-m", "moe", "plot", str(run)], capture_output=True, text=True)
    assert plot.returncode == 0, plot.stderr
    assert (run / "plots" / "loss.png").stat().st_size > 1000
    assert (run / "plots" / "expert_load_layer1.png").exists()
    convert = subprocess.run(
        [sys.executable, "-m", "moe", "convert", "to-hf", str(run / "checkpoints" / "4"), str(tmp_path / "hf")],
        capture_output=True,
        text=True,
    )
    assert convert.returncode == 0, convert.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_local_experts"] == 8


def test_missing_data_fails_clearly_before_compiling(tmp_path):
    result = moe_train(tmp_path / "run", f"data.paths=[{tmp_path / 'nope'}]")
    assert result.returncode == 1 and "matches no files" in result.stderr


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_log_the_same_losses_as_one_and_only_process_0_writes_the_shared_files(tmp_path, children, gcs):
    # rows split over the processes (data=2 is the outer axis), each process's sequences
    # over 2 of its devices (context) and its experts over 2 (expert)
    common = [
        "train.steps=3",
        "checkpoint.every_steps=3",
        "data.workers=0",
        "train.batch_size=8",
        "mesh.data=2",
        "mesh.context=2",
        "mesh.expert=2",
    ]
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe",
            "train",
            str(ROOT / "configs/tiny-moe.yaml"),
            "--run-dir",
            str(tmp_path / "one"),
            "--no-progress",
            *SMALL,
            *common,
        ],
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stdout + single.stderr
    port = _free_port()
    for pid in range(2):
        # process 1 compiles 35 s after process 0 (a loaded host): gloo drops a peer 30 s late
        # unless the processes meet after compiling
        env = dict(
            os.environ,
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            JAX_PLATFORMS="cpu",
            MOE_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            MOE_NUM_PROCESSES="2",
            MOE_PROCESS_ID=str(pid),
            MOE_FAULT_COMPILE_DELAY_S=str(35 * pid),
        )
        children.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "moe",
                    "train",
                    str(ROOT / "configs/tiny-moe.yaml"),
                    "--run-dir",
                    "gs://moe-test/runs/two",
                    "--no-progress",
                    *SMALL,
                    *common,
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    outputs = [c.communicate(timeout=600)[0] for c in children]
    assert all(c.returncode == 0 for c in children), [out[-4000:] for out in outputs]
    assert "over 8 devices in 2 processes" in outputs[0] and "met the other processes" in outputs[1]
    assert "'context': 2, 'expert': 2" in outputs[0]
    one, two = records(tmp_path / "one"), records("gs://moe-test/runs/two")  # the 2-process run on gs://
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["batch_crc32"] == b["batch_crc32"]
    assert checkpoint_steps("gs://moe-test/runs/two") == [3]
    # the shared files are process 0's alone: config.yaml uploaded once, one log's lines
    assert gcs["runs/two/config.yaml"] == 1
    log = (storage.location("gs://moe-test/runs/two") / "train.log").read_text()
    assert log.count("resolved config") == 1 and log.count("over 8 devices in 2 processes") == 1


def test_a_data_pipeline_whose_close_never_returns_does_not_hang_the_end_of_a_run(caplog):
    from moe.training import loop

    class Stuck:  # as grain's close, blocked on a message its worker left half-written
        def close(self):
            threading.Event().wait()

    start = time.perf_counter()
    loop._close_data(Stuck(), timeout_s=0.5)
    assert time.perf_counter() - start < 5
    assert "the data pipeline did not stop within" in caplog.text
