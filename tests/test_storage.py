"""Run directories on gs:// (a fake in-memory bucket, tests/fake_gcs.py) through the same path
layer as local ones: train, kill, resume, plot, convert and sweep give what local runs give."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from etils import epath

from moe import storage
from moe.config import ConfigError
from moe.study import report, sweep

from helpers import ROOT

SMALL = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.d_ff=32",
    "train.batch_size=2",
    "train.seq_len=32",
    "train.eval_every=2",
    "train.eval_batches=1",
    "checkpoint.every_steps=2",
    "data.workers=0",
]
TIMING = ("tokens_per_s", "mfu")


def moe(*args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "moe", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, XLA_FLAGS="", **(env or {})),
        cwd=cwd,
    )


def records(run_dir):
    text = storage.location(run_dir).joinpath("metrics.jsonl").read_text()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in text.splitlines()]


def test_a_killed_runs_staging_folder_is_removed_by_the_next_start(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{storage.STAGING_PREFIX}{dead.pid}-abc"  # a SIGKILLed run's folder
    live = tmp_path / f"{storage.STAGING_PREFIX}{os.getpid()}-def"  # a running one's
    other = tmp_path / "moe-staging-notapid"
    for folder in (stale, live, other):
        (folder / "tensorboard").mkdir(parents=True)
        (folder / "metrics.jsonl").write_text("{}\n")
    staging = storage.Staging(epath.Path("gs://moe-test/runs/x"))
    assert not stale.exists() and live.exists() and other.exists()
    assert staging.local.parent == tmp_path and staging.local.name.startswith(f"moe-staging-{os.getpid()}-")
    staging.close()
    assert not staging.local.exists()


@pytest.mark.parametrize(
    "where", ["gs:/moe-test/runs/x", "gs://", "gs:///runs/x", "ftp://host/runs/x", "gcs://moe-test/x"]
)
def test_malformed_locations_are_refused_in_one_line(where):
    with pytest.raises(ConfigError, match="malformed location .*gs://BUCKET/PATH"):
        storage.location(where)


def test_a_malformed_run_dir_is_one_line_and_nothing_is_written(tmp_path):
    result = moe("train", ROOT / "configs/tiny-moe.yaml", "--run-dir", "gs:/moe-test/runs/x", *SMALL, cwd=tmp_path)
    assert result.returncode == 2 and "malformed location 'gs:/moe-test/runs/x'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_train_killed_and_resumed_on_gcs_equals_a_local_run_then_plots_and_converts(tmp_path, gcs):
    local, remote = tmp_path / "local", "gs://moe-test/runs/resumed"
    args = [ROOT / "configs/tiny-moe.yaml", "--no-progress", *SMALL, "train.steps=4"]
    assert moe("train", *args[:1], "--run-dir", local, *args[1:]).returncode == 0
    killed = moe("train", *args[:1], "--run-dir", remote, *args[1:], env={"MOE_FAULT_SIGKILL_AT_STEP": "2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [r["step"] for r in records(remote)] == [1, 2, 2]  # stored before the checkpoint of step 2
    resumed = moe("train", *args[:1], "--run-dir", remote, *args[1:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert records(remote) == records(local)  # losses, validation and the batches' checksums
    run = epath.Path(remote)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    log = (run / "train.log").read_text()
    assert log.count("resolved config") == 2 and "resumed from the checkpoint at step 2" in log
    assert gcs["runs/resumed/config.yaml"] == 2  # once per start
    assert any((run / "tensorboard").iterdir())

    plotted = moe("plot", remote)
    assert plotted.returncode == 0, plotted.stderr[-2000:]
    assert (run / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    converted = moe("convert", "to-hf", remote + "/checkpoints/4", tmp_path / "hf")
    assert converted.returncode == 0, converted.stderr[-2000:]
    local_hf = moe("convert", "to-hf", local / "checkpoints/4", tmp_path / "hf-local")
    assert local_hf.returncode == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "hf-local" / name).read_bytes()
    # a gs:// run as a source: generation, and the starting weights of another run
    said = [moe("generate", run_dir, "--prompt", "The sky", "--max-new-tokens", "4") for run_dir in (remote, local)]
    assert said[0].returncode == 0 and said[0].stdout == said[1].stdout, said[0].stderr[-2000:]
    tuned = moe(
        "train", *args[:1], "--run-dir", tmp_path / "tuned", *args[1:], "train.steps=1", f"train.init_from={remote}"
    )
    assert (
        tuned.returncode == 0
        and "with the weights of gs://moe-test/runs/resumed" in (tmp_path / "tuned" / "train.log").read_text()
    ), tuned.stderr[-2000:]


@pytest.mark.slow
def test_a_sweep_on_gcs_gives_the_local_sweeps_metrics_and_reports(tmp_path, gcs, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    spec = {
        "name": "t",
        "base": str(ROOT / "configs/tiny-moe.yaml"),
        "overrides": [*SMALL, "train.steps=2"],
        "variants": {"top1": {"model.top_k": 1}},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    here = sweep.load(path, runs_dir=tmp_path / "runs")
    path.write_text(yaml.safe_dump({**spec, "runs_dir": "gs://moe-test/sweeps/t"}))
    there = sweep.load(path)
    assert str(there.runs[0].run_dir) == "gs://moe-test/sweeps/t/top1"
    assert sweep.run_local(here, list(here.runs)) == [] and sweep.run_local(there, list(there.runs)) == []
    assert there.runs[0].finished() and records(there.runs[0].run_dir) == records(here.runs[0].run_dir)
    readme, *_ = report.report(there, tmp_path / "report")
    assert "top1" in readme.read_text()
