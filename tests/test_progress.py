"""Progress bars: drawn on a terminal, absent in pipes and with --no-progress."""

import io
import json
import subprocess
import sys

import pytest

from moe import cli, progress
from moe.study import sweep as sweep_lib

from helpers import ROOT, run_on_terminal
from hf_models import make_hf


def test_a_bar_draws_on_a_terminal_and_not_in_a_pipe(terminal, monkeypatch):
    for _ in progress.bar(range(3), desc="counting", unit="thing"):
        pass
    assert "counting:   0%" in terminal.getvalue() and "0/3" in terminal.getvalue()  # a total: an ETA
    pipe = io.StringIO()
    monkeypatch.setattr(progress, "stream", lambda: pipe)
    for _ in progress.bar(range(3), desc="counting"):
        pass
    assert pipe.getvalue() == ""


def _answers(tmp_path):
    for name, answers in [("a", ["x", "y"]), ("b", ["x", "z"])]:
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in zip(["p1", "p2"], answers))
        )
    return [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--judge", "cmd:echo tie"]


def test_no_progress_turns_the_bars_off(tmp_path, terminal):
    assert cli.main(["compare", *_answers(tmp_path)]) == 0
    assert "judge cmd:echo tie" in terminal.getvalue()
    terminal.seek(0)
    terminal.truncate()
    assert cli.main(["compare", *_answers(tmp_path), "--no-progress"]) == 0
    assert terminal.getvalue() == ""


def test_a_sweeps_runs_show_their_own_bar_only_on_a_terminal(terminal, monkeypatch):
    sweep = sweep_lib.load(ROOT / "experiments/aux-coef/sweep.yaml")
    assert "--no-progress" not in sweep_lib.train_command(sweep, sweep.runs[0])
    monkeypatch.setattr(progress, "stream", io.StringIO)
    assert "--no-progress" in sweep_lib.train_command(sweep, sweep.runs[0])


@pytest.mark.slow
def test_convert_shows_progress_on_a_terminal_and_none_in_a_pipe(tmp_path):
    hf_dir = make_hf(tmp_path, "mixtral")
    command = [sys.executable, "-m", "moe", "convert", "from-hf", str(hf_dir)]
    code, shown = run_on_terminal([*command, str(tmp_path / "tty")], timeout=300, cwd=ROOT)
    assert code == 0, shown
    assert "reading Hugging Face tensors" in shown and "tensor/s" in shown
    piped = subprocess.run([*command, str(tmp_path / "pipe")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert "reading Hugging Face tensors" not in piped.stdout + piped.stderr and "\r" not in piped.stderr
