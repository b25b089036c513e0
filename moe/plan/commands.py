"""`moe params`, `moe aot` and `moe plan`: sizing a model and planning its TPU run.

libtpu is imported only when `moe aot` or `moe plan` runs (the tpu extra); every command's
code is imported when it runs, so `moe --help` does not load JAX.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from moe import config as config_lib
from moe.config import QUANT_FORMATS


def add_out(parser, what: str) -> None:
    """--out FILE for a command that writes one JSON report (--json: the same, its older name)."""
    parser.add_argument("--out", "--json", dest="out", default=None, metavar="FILE", help=f"also write {what} here")


def run_params(args) -> int:
    from moe.model.params import count_params, format_count
    from moe.quant.params import format_bytes
    from moe.training.trainable import counts

    cfg = config_lib.load(args.config, args.overrides)
    print(format_count(cfg.model, count_params(cfg.model)))
    tuned = counts(cfg)
    print(
        f"trainable parameters: {tuned['trainable']:,} (LoRA adapters {tuned['adapters']:,}); frozen (no "
        f"gradients, no optimizer state): {tuned['frozen']:,}"
    )
    if args.quant:
        print(format_bytes(cfg, args.quant))
    return 0


def run_aot(args) -> int:
    # compiling needs no TPU: let several processes load libtpu (CI, sweeps, a run on this host)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from moe.plan import aot

    cfg = config_lib.load(args.config, args.overrides)
    try:
        report = aot.compile_for_topology(cfg, args.topology, args.slices)
    except aot.CompileError as e:
        print(f"moe aot: error: {e}", file=sys.stderr)
        return 1
    print(report.format())
    if args.out:
        Path(args.out).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.fits else 3


def run_plan(args) -> int:
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # the planner and its compiles each load libtpu
    from moe.plan import meshes

    result = meshes.plan(
        args.config,
        args.overrides,
        args.topology,
        args.jobs,
        Path(args.cache_dir) if args.cache_dir else None,
        args.slices,
        meshes.parse_fixed(args.fix),
    )
    print(meshes.format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["best_command"] else 3


def add_parsers(sub) -> None:
    p = sub.add_parser("params", help="total and active parameter counts, from shapes alone")
    config_lib.add_cli_args(p)
    p.add_argument(
        "--quant",
        choices=QUANT_FORMATS,
        help="also the weights' bytes in this format (beside the "
        "other formats), from the config's quant.include / exclude",
    )
    p.set_defaults(func=run_params)
    p = sub.add_parser("aot", help="compile the train step for a TPU topology here; per-chip memory and FLOPs")
    config_lib.add_cli_args(p)
    p.add_argument("--topology", required=True, help="e.g. v5p-128, v5e-16 or v5p:2x2x2 (needs the tpu extra)")
    p.add_argument(
        "--slices",
        type=int,
        default=1,
        help="multislice: this many slices over DCN (set the mesh.dcn_* sizes to match)",
    )
    add_out(p, "the report as JSON")
    p.set_defaults(func=run_aot)
    p = sub.add_parser("plan", help="compile every mesh that divides a config and a TPU topology; a ranked table")
    config_lib.add_cli_args(p)
    p.add_argument("--topology", required=True, help="e.g. v5p-128 (needs the tpu extra)")
    p.add_argument(
        "--slices",
        type=int,
        default=1,
        help="multislice: this many slices of the topology over DCN (data / fsdp cross them)",
    )
    p.add_argument(
        "--fix",
        action="append",
        default=[],
        metavar="AXIS=N",
        help="hold a mesh axis at a size (repeatable), e.g. --fix tensor=1 --fix data=1",
    )
    p.add_argument("--jobs", type=int, default=2, help="compiles in parallel (each takes a core and its memory)")
    add_out(p, "the ranked plans as JSON")
    p.add_argument("--cache-dir", default=None, help="compiled reports (default ~/.cache/moe/plans or $MOE_PLAN_CACHE)")
    p.set_defaults(func=run_plan)
