"""Sweep specs: expansion, validation, resume-skip, launch commands, and a report of a real sweep."""

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml

from moe.config import ConfigError
from moe.study import report, sweep

from helpers import ROOT, kill_group, spawn

STUDIES = sorted((ROOT / "experiments").glob("*/sweep.yaml"))
SMALL = {
    "model.d_model": 32,
    "model.n_layers": 2,
    "model.n_heads": 4,
    "model.n_kv_heads": 2,
    "model.d_ff": 32,
    "train.batch_size": 2,
    "train.seq_len": 32,
    "train.warmup_steps": 1,
    "train.steps": 2,
    "train.eval_every": 2,
    "train.eval_batches": 1,
    "checkpoint.every_steps": 2,
    "data.workers": 0,
}


def write_spec(tmp_path, **spec):
    spec = {"name": "t", "base": str(ROOT / "configs/study-moe.yaml"), **spec}
    path = tmp_path / "spec" / "sweep.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_grid_variants_and_seeds_expand_in_order(tmp_path):
    path = write_spec(
        tmp_path,
        overrides=["train.steps=7"],
        seeds=[0, 1],
        variants={"moe": {}, "dense": {"model.n_experts": 0, "model.d_ff": 512}},
        grid={"train.lr": [1e-3, 3e-3], "train.aux_loss_coef": [0.0, 0.1]},
    )
    s = sweep.load(path, runs_dir=tmp_path / "runs")
    assert len(s.runs) == 2 * 2 * 2 * 2
    first, last = s.runs[0], s.runs[-1]
    assert first.name == "moe_lr-0.001_aux_loss_coef-0.0_seed-0"
    assert last.name == "dense_lr-0.003_aux_loss_coef-0.1_seed-1"
    assert last.overrides == (
        "train.steps=7",
        "model.n_experts=0",
        "model.d_ff=512",
        "train.lr=0.003",
        "train.aux_loss_coef=0.1",
        "seed=1",
    )
    assert last.changes == last.overrides[1:]
    assert last.config.model.n_experts == 0 and last.config.train.lr == 0.003 and last.config.seed == 1
    assert last.config.train.steps == 7 and last.variant == "dense_lr-0.003_aux_loss_coef-0.1"
    assert last.run_dir == tmp_path / "runs" / last.name
    assert len({r.name for r in s.runs}) == len(s.runs)


def test_a_spec_without_variants_or_seeds_is_one_run_with_the_base_seed(tmp_path):
    s = sweep.load(write_spec(tmp_path))
    assert [r.name for r in s.runs] == ["base"] and s.runs[0].overrides == ()
    assert s.runs[0].run_dir.as_posix() == "runs/sweeps/t/base"


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"grid": {"model.n_expert": [4]}}, "run 'n_expert-4'.*n_experts"),
        ({"grid": {"model.n_experts": []}}, "non-empty list"),
        ({"seeds": [0, "one"]}, "seeds must be"),
        ({"variants": {"a": ["model.top_k"]}}, "variants.a must be"),
        ({"sweeps": {}}, "unknown key"),
        ({"name": "../up"}, "names a folder"),
        ({"launch": {"slurm": ["-p", "x"]}}, "launch maps tpu_vm or xpk"),
        ({"variants": {"a": {"model.top_k": 9}}}, "run 'a'.*top_k"),
    ],
)
def test_bad_specs_are_refused_before_anything_runs(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message):
        sweep.load(write_spec(tmp_path, **spec))


def test_every_shipped_study_expands_and_validates():
    assert {p.parent.name for p in STUDIES} >= {"dense-vs-moe", "experts-and-topk", "aux-coef", "frozen-router"}
    for path in STUDIES:
        s = sweep.load(path)
        assert len(s.runs) >= 2, path
        assert (path.parent / "README.md").is_file(), f"{path.parent} has no committed report"


def test_launch_commands_carry_the_config_and_every_override(tmp_path):
    s = sweep.load(
        write_spec(
            tmp_path,
            variants={"a": {"model.top_k": 1}},
            grid={"train.lr": [0.001]},
            launch={"tpu_vm": ["--zone", "us-east5-a", "--accelerator", "v5p-32"]},
        )
    )
    run = s.runs[0]
    tpu = sweep.launch_command(s, run, "tpu_vm")
    assert tpu[:2] == ["bash", str(ROOT / "launch/tpu_vm.sh")]
    assert tpu[2:8] == ["--name", "t-lr-0-001", "--zone", "us-east5-a", "--accelerator", "v5p-32"]
    assert tpu[-3:] == [str(s.base), "model.top_k=1", "train.lr=0.001"]
    xpk = sweep.launch_command(s, run, "xpk")
    assert xpk[2:4] == ["--workload", "t-lr-0-001"] and xpk[-2:] == ["model.top_k=1", "train.lr=0.001"]


def small_sweep(tmp_path):
    variants = {"top1": {"model.top_k": 1}, "dense": {"model.n_experts": 0}}
    return sweep.load(write_spec(tmp_path, overrides=SMALL, variants=variants), runs_dir=tmp_path / "runs")


@pytest.fixture
def finished_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")  # one device per run, as on a plain machine
    s = small_sweep(tmp_path)
    assert sweep.run_local(s, list(s.runs)) == []
    return s


@pytest.mark.slow
def test_a_two_step_sweep_runs_then_skips_finished_runs_and_reports(finished_sweep, tmp_path, monkeypatch, capsys):
    s = finished_sweep
    assert all(r.finished() for r in s.runs)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(subprocess, "Popen", no_training)
    capsys.readouterr()
    assert sweep.run_local(s, list(s.runs)) == []
    assert capsys.readouterr().out.count("finished, skipped") == 2
    sweep.print_launches(s, list(s.runs), "tpu_vm")
    assert capsys.readouterr().out.count("finished") == 2

    # the report: a table row per run with numbers read from the runs, and the plots
    readme, *plots = report.report(s)
    text = readme.read_text()
    for run in s.runs:  # each row against metrics.jsonl read here, line by line
        lines = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in lines if "ce_loss" in r]
        val = [r["val_loss"] for r in lines if "val_loss" in r]
        assert [r["step"] for r in train] == [1, 2] and len(val) == 1
        ce = sum(r["ce_loss"] for r in train) / 2  # 2 steps: the "last 10%, at least 5" is both
        speed = sorted(r["tokens_per_s"] for r in train)
        row = next(line for line in text.splitlines() if line.startswith(f"| {run.name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2:7] == [
            "2/2",
            f"{ce:.3f}",
            f"{val[0]:.3f}",
            f"{math.exp(val[0]):.1f}",
            f"{(speed[0] + speed[1]) / 2:,.0f}",
        ], row
        if run.name == "dense":
            assert cells[7] == "-"
        else:
            imbalance = sum(sum(r["expert_imbalance"]) / len(r["expert_imbalance"]) for r in train) / 2
            assert float(cells[7]) >= 1.0 and cells[7] == f"{imbalance:.2f}"
    assert {p.name for p in plots} == {"loss.png", "balance.png"}
    assert all(p.stat().st_size > 10_000 for p in plots)

    # the CLI writes the same report, into another folder
    from moe import cli

    capsys.readouterr()
    assert (
        cli.main(
            ["report", str(s.spec_path), "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "cli-report")]
        )
        == 0
    )
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(tmp_path / "cli-report" / n) for n in ("README.md", "loss.png", "balance.png"))
    assert (tmp_path / "cli-report" / "README.md").read_text().count("| top1 |") == 1

    # rerunning keeps the hand-written analysis around the generated block
    readme.write_text("# My study\n\nintro\n\n" + text[text.index(report.BEGIN) :] + "\n## Findings\n\nkept\n")
    report.report(s)
    again = readme.read_text()
    assert again.startswith("# My study\n\nintro") and again.rstrip().endswith("kept")
    assert again.count(report.BEGIN) == 1 and "| top1 |" in again


@pytest.mark.slow
def test_an_unfinished_run_is_resumed_from_its_checkpoint(finished_sweep, tmp_path):
    longer = sweep.load(
        write_spec(tmp_path, overrides={**SMALL, "train.steps": 3}, variants={"top1": {"model.top_k": 1}}),
        runs_dir=tmp_path / "runs",
    )
    run = longer.runs[0]
    assert run.run_dir == finished_sweep.runs[0].run_dir and not run.finished()
    assert sweep.run_local(longer, [run]) == []
    assert run.finished()
    assert "resumed from the checkpoint at step 2" in (run.run_dir / "train.log").read_text()
    steps = [r["step"] for r in report.summarize(run).train]
    assert steps == [1, 2, 3]


def test_only_selects_runs_by_name_or_variant(tmp_path):
    s = small_sweep(tmp_path)
    assert [r.name for r in sweep.select(s, ["dense"])] == ["dense"]
    with pytest.raises(ConfigError, match="matches no run"):
        sweep.select(s, ["nope"])


def test_cli_prints_dry_run_and_launch_commands_and_refuses_bad_specs(tmp_path, capsys):
    from moe import cli

    spec = write_spec(tmp_path, grid={"model.top_k": [1, 2]}, launch={"xpk": ["--cluster", "c"]})
    assert cli.main(["sweep", str(spec), "--dry-run", "--runs-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(" -m moe train " in line and "--run-dir" in line for line in out)
    assert out[0].endswith("model.top_k=1") and not (tmp_path / "r").exists()
    assert cli.main(["sweep", str(spec), "--launcher", "xpk", "--only", "top_k-2"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert shlex.split(line)[1].endswith("launch/xpk.sh") and "--cluster c" in line and line.endswith("top_k=2")
    bad = write_spec(tmp_path, grid={"model.top_k": [9]})
    assert cli.main(["sweep", str(bad)]) == 2
    assert "top_k" in capsys.readouterr().err


def test_seed_table_pairs_each_variant_with_the_first_seed_by_seed(tmp_path):
    s = sweep.load(write_spec(tmp_path, variants={"a": {}, "b": {"model.top_k": 1}}, seeds=[0, 1]))
    val = {"a_seed-0": 6.0, "a_seed-1": 5.0, "b_seed-0": 6.5, "b_seed-1": 5.25}
    results = [
        report.Result(
            run=r,
            steps_done=300,
            train_ce=4.0,
            val_loss=val[r.name],
            tokens_per_s=1.0,
            imbalance=2.0,
            params_total=1,
            params_active=1,
        )
        for r in s.runs
    ]
    table = report.seeds_table(results)
    assert "| a | 2 | 5.500 ± 0.707 | +0.000, +0.000 |" in table
    assert "| b | 2 | 5.875 ± 0.884 | +0.500, +0.250 |" in table
    assert report.seeds_table(results[:1] + results[2:3]) == ""  # one seed each: no table


def moe_sweep(spec, runs_dir, log):
    return spawn(
        [sys.executable, "-m", "moe", "sweep", str(spec), "--runs-dir", str(runs_dir)],
        log,
        dict(os.environ, XLA_FLAGS=""),
    )


@pytest.mark.slow
def test_sweep_forwards_a_signal_to_its_run_and_exits_130_and_a_failed_run_exits_1(tmp_path):
    long = {**SMALL, "train.steps": 1000, "train.eval_every": 1000, "checkpoint.every_steps": 1000}
    spec = write_spec(tmp_path, overrides=long, variants={"long": {}})
    sweeper = moe_sweep(spec, tmp_path / "runs", tmp_path / "sweep.log")
    try:
        metrics = tmp_path / "runs" / "long" / "metrics.jsonl"
        deadline = time.time() + 300
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
            time.sleep(0.05)
        sweeper.send_signal(signal.SIGINT)  # to the sweep only: it must pass it on
        assert sweeper.wait(timeout=300) == 130, (tmp_path / "sweep.log").read_text()
    finally:
        kill_group(sweeper)
    run_dir = tmp_path / "runs" / "long"
    assert "SIGINT received: saved step" in (run_dir / "train.log").read_text()
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]

    bad = write_spec(tmp_path, overrides={**SMALL, "data.paths": [str(tmp_path / "none")]}, variants={"nodata": {}})
    failing = moe_sweep(bad, tmp_path / "runs2", tmp_path / "fail.log")
    try:
        assert failing.wait(timeout=300) == 1
    finally:
        kill_group(failing)
    assert "nodata: failed (exit 1)" in (tmp_path / "fail.log").read_text()
