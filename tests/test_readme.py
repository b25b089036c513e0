"""The commands of README.md and docs/ run as written: every `moe` line parses with the real
command-line parser, the cheap ones run (`moe params`, sweep dry runs, the launchers' dry
runs), and every `moe aot` / `moe plan` line's mesh and batch divide its topology's chips
(the compile itself is test_aot's, on a tiny model)."""

import re
import shlex
import subprocess

import pytest

from moe import cli
from moe import config as config_lib
from moe.model.params import count_params
from moe.parallel import mesh as mesh_lib
from moe.plan import aot

from helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_commands() -> list[list[str]]:
    """Every command in the bash blocks of README.md and docs/, as argument lists (`a && b`
    is two)."""
    commands = []
    text = "\n".join(path.read_text() for path in DOCS)
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1 :]
    return [c for c in commands if c]


def moe_lines(sub: str | None = None) -> list[list[str]]:
    return [c[1:] for c in readme_commands() if c[0] == "moe" and (sub is None or c[1] == sub)]


def test_the_readme_shows_the_commands_this_test_reads():
    assert len(moe_lines()) >= 30 and moe_lines("aot") and moe_lines("params") and moe_lines("sweep")
    assert any(c[0].startswith("launch/") for c in readme_commands())


@pytest.mark.parametrize("argv", moe_lines(), ids=" ".join)
def test_every_moe_line_in_the_readme_parses(argv):
    parser = cli.build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:
        pytest.fail(f"`moe {' '.join(argv)}` does not parse (exit {e.code})")
    assert all("=" in e and not e.startswith("-") for e in extra), f"unknown arguments {extra}"
    assert hasattr(args, "overrides") or not extra


def test_the_readme_params_and_sweep_dry_runs_run(capsys):
    for argv in moe_lines("params") + [a for a in moe_lines("sweep") if "--dry-run" in a]:
        assert cli.main(argv) == 0, f"`moe {' '.join(argv)}` failed: {capsys.readouterr().err}"


def test_the_readme_aot_lines_divide_their_topology():
    for argv in moe_lines("aot"):
        args, extra = cli.build_parser().parse_known_args(argv)
        cfg = config_lib.load(args.config, [*args.overrides, *extra])
        _, _, chips = aot.parse_topology(args.topology)
        mesh_lib.check_divisibility(cfg, mesh_lib.mesh_shape(cfg.mesh, chips))  # raises with the fix


def test_the_readme_plan_lines_have_meshes_to_compile():
    from moe.plan import meshes as plan

    assert moe_lines("plan")
    for argv in moe_lines("plan"):
        args, extra = cli.build_parser().parse_known_args(argv)
        cfg = config_lib.load(args.config, [*args.overrides, *extra])
        _, _, chips = aot.parse_topology(args.topology)
        dividing = []
        for mesh in plan.factorizations(chips):
            try:
                mesh_lib.check_divisibility(cfg, mesh)
                dividing.append(mesh)
            except config_lib.ConfigError:
                pass
        assert dividing, f"no mesh of {chips} chips divides `moe {' '.join(argv)}`"


def test_the_readme_launcher_lines_dry_run():
    lines = [c for c in readme_commands() if c[0].startswith("launch/")]
    for words in lines:
        dry = words if "--dry-run" in words else [words[0], "--dry-run", *words[1:]]
        result = subprocess.run(
            ["bash", str(ROOT / dry[0]), *dry[1:]], capture_output=True, text=True, cwd=ROOT, timeout=120
        )
        assert result.returncode == 0, f"{' '.join(dry)}: {result.stderr}"


def test_the_readme_config_table_states_each_shipped_configs_shape_and_counts():
    """Every row of the README's config table, recomputed from the config it names."""
    rows = re.findall(r"^\| `([\w-]+)` \| (dense|MoE) \|(.*)\|$", (ROOT / "README.md").read_text(), re.M)
    assert {name for name, _, _ in rows} == {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    for name, kind, rest in rows:
        m = config_lib.load(name).model
        counts = count_params(m)
        expected = [
            m.n_layers,
            m.d_model,
            f"{m.n_heads} / {m.n_kv_heads}",
            m.d_ff,
            f"{m.n_experts}, top-{m.top_k}" if m.is_moe else "-",
            m.sliding_window or "-",
            f"{counts.total:,}",
            f"{counts.active:,}",
        ]
        assert (kind == "MoE") == m.is_moe, name
        assert [c.strip() for c in rest.split("|")] == [str(v) for v in expected], name
