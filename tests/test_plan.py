import itertools
import json
import os
import subprocess
import sys

import pytest
from test_aot import needs_libtpu

from moe.plan import meshes as plan

from helpers import ROOT


def moe_plan(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(
        [sys.executable, "-m", "moe", "plan", *map(str, args)], capture_output=True, text=True, env=env, timeout=900
    )


def test_factorizations_are_every_ordered_split_of_the_chips():
    meshes = plan.factorizations(8)
    assert len(meshes) == 35  # 2^3 over five axes: C(3 + 4, 4)
    assert all(m["data"] * m["fsdp"] * m["context"] * m["expert"] * m["tensor"] == 8 for m in meshes)
    assert len({tuple(m.values()) for m in meshes}) == 35


TINY = [
    ROOT / "configs/tiny-moe.yaml",
    "--topology",
    "v5p-8",
    "train.seq_len=64",
    "model.vocab_size=512",
    "model.n_layers=1",
]


@needs_libtpu
@pytest.mark.slow
def test_plan_compiles_every_dividing_mesh_ranks_them_and_caches(tmp_path):
    args = [*TINY, "train.batch_size=8", "--jobs", "2", "--cache-dir", tmp_path / "cache"]
    first = moe_plan(*args, "--out", tmp_path / "plans.json")
    assert first.returncode == 0, first.stdout + first.stderr
    result = json.loads((tmp_path / "plans.json").read_text())
    # tiny-moe: 4 heads, 2 kv heads, 8 experts; 8 sequences over data x fsdp x expert, 64 tokens over context
    sizes = (1, 2, 4)
    expected = {
        (d, f, c, e, t) for d, f, c, e in itertools.product(sizes, repeat=4) for t in (1, 2) if d * f * c * e * t == 4
    }
    assert {tuple(p["mesh"][a] for a in plan.AXES) for p in result["plans"]} == expected and len(expected) == 14
    reports = [p["report"] for p in result["plans"]]
    for r in reports:  # `moe aot --out` fields, from a real compile
        assert r["fits"] and r["total_bytes"] <= r["hbm_bytes"] and r["flops"] > 0 and r["temp_bytes"] > 0
        assert r["params_bytes"] > 0 and r["opt_state_bytes"] > 0 and not r["cached"]
    steps = [r["roofline"]["step_s"] for r in reports]
    assert steps == sorted(steps)  # ranked by the roofline step time read from the compiles
    rows = [line for line in first.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    for row, p in zip(rows, result["plans"], strict=True):  # the table shows the numbers it read
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == ", ".join(str(p["mesh"][a]) for a in plan.AXES)
        assert cells[9] == f"{p['report']['roofline']['step_s']:.4g}"
    best = result["plans"][0]["mesh"]
    assert result["best_command"].endswith(" ".join(plan.mesh_overrides(best)) + " --run-dir runs/NAME")
    again = moe_plan(*args, "--json", tmp_path / "again.json")
    cached = json.loads((tmp_path / "again.json").read_text())
    assert again.returncode == 0 and all(p["report"]["cached"] for p in cached["plans"])
    assert [p["mesh"] for p in cached["plans"]] == [p["mesh"] for p in result["plans"]]


@needs_libtpu
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["train.batch_size=1", "train.seq_len=63"],  # one sequence, and no context split of 63 tokens
            "no mesh of 4 chips divides this model with a micro-batch of 1 sequences of 63 tokens; "
            "set train.batch_size= to a multiple",
        ),
        (["--topology", "v9-8"], "unknown topology 'v9-8'"),
        (["--fix", "tensor=3"], "no mesh of 4 chips with {'tensor': 3} divides this model; relax --fix"),
        (["--fix", "pipeline=2"], "--fix 'pipeline=2': use AXIS=N"),
    ],
)
@pytest.mark.slow
def test_bad_plans_are_one_line_errors(args, message, tmp_path):
    result = moe_plan(*TINY, *args, "--cache-dir", tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("moe plan")]) == 1
    assert not any(tmp_path.iterdir())


@needs_libtpu
@pytest.mark.slow
def test_multislice_candidates_split_only_data_and_fsdp_over_dcn():
    from moe import config

    cfg = config.load(ROOT / "configs/tiny-moe.yaml", ["train.batch_size=8", "model.vocab_size=512"])
    meshes, _ = plan.candidates(cfg, "v5p-8", slices=2)
    assert meshes and all(m["data"] * m["fsdp"] * m["context"] * m["expert"] * m["tensor"] == 8 for m in meshes)
    for m in meshes:
        assert m["dcn_data"] * m["dcn_fsdp"] == 2 and m["data"] % m["dcn_data"] == 0 and m["fsdp"] % m["dcn_fsdp"] == 0
    found = {(m["data"], m["fsdp"], m["context"], m["expert"], m["tensor"], m["dcn_data"]) for m in meshes}
    assert {(2, 1, 1, 4, 1, 2), (1, 2, 1, 4, 1, 1), (2, 2, 1, 2, 1, 2), (2, 2, 1, 2, 1, 1), (2, 1, 2, 2, 1, 2)} <= found
    assert not any(m["data"] == m["fsdp"] == 1 for m in meshes)  # expert / tensor alone never cross slices
    held, _ = plan.candidates(cfg, "v5p-8", slices=2, fixed={"tensor": 1, "data": 2})
    assert held and all(m["tensor"] == 1 and m["data"] == 2 for m in held) and len(held) < len(meshes)
    assert plan.mesh_overrides(meshes[0])[-2:] == [
        f"mesh.dcn_data={meshes[0]['dcn_data']}",
        f"mesh.dcn_fsdp={meshes[0]['dcn_fsdp']}",
    ]
    assert (
        plan.describe({"data": 2, "fsdp": 2, "context": 1, "expert": 2, "tensor": 1, "dcn_data": 2, "dcn_fsdp": 1})
        == "2, 2, 1, 2, 1 (DCN: data 2)"
    )
