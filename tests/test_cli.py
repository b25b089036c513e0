import json
import os
import shutil
import subprocess
import sys

import pytest

from moe.cli import main

from helpers import ROOT, run_on_terminal


@pytest.mark.parametrize(
    "name,total,active",
    [
        ("mistral-7b", "7,241,732,096", "7,241,732,096"),
        ("mixtral-8x7b", "46,702,792,704", "12,879,925,248"),
        ("mixtral-8x22b", "140,630,071,296", "39,161,468,928"),
        ("qwen3-30b-a3b", "30,532,122,624", "3,353,032,704"),
    ],
)
def test_moe_params_prints_published_counts(name, total, active, capsys):
    assert main(["params", str(ROOT / f"configs/{name}.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"total parameters: {total}" in out and f"active parameters per token: {active}" in out


@pytest.mark.slow
def test_python_dash_m_and_overrides():
    result = subprocess.run(
        [sys.executable, "-m", "moe", "params", str(ROOT / "configs/tiny-moe.yaml"), "model.n_experts=4"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "4 experts, top-2" in result.stdout


def test_bad_config_exits_2_with_the_message(capsys):
    assert main(["params", str(ROOT / "configs/tiny-moe.yaml"), "model.top_k=12"]) == 2
    assert "top_k (12) must be between 1 and model.n_experts (8)" in capsys.readouterr().err


@pytest.mark.slow
def test_tokenizer_train_through_the_cli(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(20):
        (docs / f"{i}.txt").write_text(f"Document {i}: " + "the quick brown fox jumps over the lazy dog " * (i + 1))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe",
            "tokenizer",
            "train",
            str(docs),
            "--vocab-size",
            "400",
            "--out",
            str(tmp_path / "tok" / "small"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    from moe.data import tokenizer

    sp = tokenizer.load(str(tmp_path / "tok" / "small.model"))
    assert sp.vocab_size() == 400 and sp.decode(sp.encode("the lazy dog")) == "the lazy dog"


@pytest.mark.slow
def test_bench_quick_through_the_cli(tmp_path):
    env = {**os.environ, "XLA_FLAGS": ""}
    command = [sys.executable, "-m", "moe", "bench", "--quick", "--out", str(tmp_path / "b.json")]
    code, shown = run_on_terminal(command, timeout=800, cwd=ROOT, env=env)
    assert code == 0, shown
    assert "bench:  20%" in shown and "MoE layer by dispatch" in shown  # its progress bar, on a terminal
    numbers = json.loads((tmp_path / "b.json").read_text())
    # bench does not re-run itself with huge-page malloc (moe/platform.py): HF's step beside ours
    # runs in the environment it was given, as ours does
    assert numbers["glibc_tunables"] == env.get("GLIBC_TUNABLES")
    assert numbers["matmul_peak_flops"] == max(numbers["matmul_flops_by_shape"].values()) > 0 and 0 < numbers["mfu"] < 1
    assert len(numbers["matmul_flops_by_shape"]) == len(numbers["torch_matmul_flops_by_shape"]) == 6
    assert 0 < numbers["bench-moe"]["mfu_vs_torch_peak"] < 1 and 0 < numbers["hf_mfu"] < 1
    assert numbers["bench-moe"]["tokens_per_s"] > 0 and numbers["hf_tokens_per_s"] > 0
    assert len(numbers["ratio_vs_hf_by_round"]) == len(numbers["hf_tokens_per_s_by_round"]) == 1  # --quick: one round
    assert abs(numbers["ratio_vs_hf"] - numbers["bench-moe"]["tokens_per_s"] / numbers["hf_tokens_per_s"]) < 1e-9
    assert "<- default here" in shown
    for batch in ("batch1", "batch8"):  # decoding: ours and HF's generate give the same tokens
        decode = numbers["decode"]["tiny-moe"][batch]
        assert decode["same_tokens"] and decode["ours"]["decode_tokens_per_s"] > 0
    assert "decode tiny-moe" in shown


def test_help_does_not_import_jax():
    code = "import sys; from moe.cli import build_parser; build_parser(); print('jax' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stdout + result.stderr


@pytest.mark.slow
def test_a_built_wheel_ships_configs_launchers_and_sweep_specs(tmp_path):
    """The wheel `pip install .` installs, put first on the path outside the repository: the
    shipped configs, sweep specs and tokenizer are found by name."""
    wheel_dir, site, source = tmp_path / "wheel", tmp_path / "site", tmp_path / "source"
    skip = shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info", "__pycache__", ".pytest_cache")
    shutil.copytree(ROOT, source, symlinks=True, ignore=skip)  # the build writes build/ beside the sources
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            *map(str, wheel_dir.glob("*.whl")),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr
    shipped = site / "moe"
    assert (shipped / "configs" / "tiny-moe.yaml").is_file() and not (shipped / "configs").is_symlink()
    assert (shipped / "launch" / "tpu_vm.sh").is_file() and (
        shipped / "experiments" / "aux-coef" / "sweep.yaml"
    ).is_file()
    assert (shipped / "experiments" / "tokenizer" / "stdlib-4k.model").is_file()
    env = {**os.environ, "PYTHONPATH": str(site), "XLA_FLAGS": "", "MOE_HUGEPAGE_MALLOC": "0"}

    def moe(*args):
        return subprocess.run(
            [sys.executable, "-m", "moe", *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
        )

    where = subprocess.run(
        [sys.executable, "-c", "import moe; print(moe.__file__)"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert where.stdout.strip() == str(shipped / "__init__.py")
    trained = moe(
        "train",
        "tiny-moe",
        "--run-dir",
        "runs/x",
        "train.steps=2",
        "train.eval_every=2",
        "train.eval_batches=1",
        "data.workers=0",
        "--no-progress",
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (tmp_path / "runs/x/checkpoints/2").is_dir()
    sweep = moe("sweep", "aux-coef", "--dry-run", "--runs-dir", "runs/sweep")
    assert sweep.returncode == 0 and "train.aux_loss_coef=0.1" in sweep.stdout, sweep.stderr
    launch = moe("sweep", "aux-coef", "--launcher", "tpu_vm", "--runs-dir", "runs/sweep")
    assert launch.returncode == 0 and str(shipped / "launch" / "tpu_vm.sh") in launch.stdout, launch.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "from-hf", "hf", "out/"],
        ["convert", "to-hf", "run", "out/"],
        ["quantize", "run", "out/", "--format", "nf4"],
        ["upcycle", "dense", "tiny-moe", "out/"],
        ["lora", "merge", "run", "out/"],
        ["lora", "export", "run", "out/"],
        ["eval", "run", "--perplexity", "--out", "out/"],
        ["analyze", "run", "--out", "out/"],
        ["report", "spec", "--out", "out/"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_every_out_folder_takes_a_trailing_slash(argv):
    """`out/` and `out` are one folder for every command that writes one (storage.out_dir)."""
    from moe.cli import build_parser

    assert build_parser().parse_args(argv).out == "out"
    assert build_parser().parse_args([a.replace("out/", "gs://b/out/") for a in argv]).out == "gs://b/out"
