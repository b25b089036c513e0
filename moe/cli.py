"""The `moe` command: `moe SUBCOMMAND ...` (also `python -m moe`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe import config as config_lib


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML config file, e.g. configs/tiny-moe.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_experts=4")


def cmd_params(args) -> int:
    from moe.params import count_params, format_count

    from moe.tune.trainable import counts

    cfg = config_lib.load(args.config, args.overrides)
    print(format_count(cfg.model, count_params(cfg.model)))
    tuned = counts(cfg)
    print(f"trainable parameters: {tuned['trainable']:,} (LoRA adapters {tuned['adapters']:,}); frozen (no "
          f"gradients, no optimizer state): {tuned['frozen']:,}")
    if args.quant:
        from moe.quant.params import format_bytes

        print(format_bytes(cfg, args.quant))
    return 0


def cmd_convert(args) -> int:
    from moe import convert

    if args.direction == "from-hf":
        cfg = convert.convert_from_hf(args.src, args.out, dtype=args.dtype)
    else:
        tokenizer = args.tokenizer
        if tokenizer == "mistral-v1":
            from moe.tokenizer import mistral_v1_path
            tokenizer = mistral_v1_path()
        cfg = convert.convert_to_hf(args.src, args.out, dtype=args.dtype,
                                    max_shard_size=args.max_shard_size, tokenizer=tokenizer)
    kind = "Mixtral" if cfg.is_moe else "Mistral"
    print(f"converted {kind} ({cfg.n_layers} layers, d_model {cfg.d_model}) {args.src} -> {args.out}")
    return 0


def cmd_train(args) -> int:
    import logging

    from moe import loop, storage

    storage.location(args.run_dir)  # a malformed gs:// URL: one line, before anything else
    cfg = config_lib.load(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        record = loop.run(cfg, args.run_dir, progress=not args.no_progress)
    except loop.TrainingError as e:
        print(f"moe train: {e}", file=sys.stderr)
        return 1
    if record:
        print(f"step {record['step']}: loss {record['loss']:.4f} -> {args.run_dir}")
    return 0


def cmd_tokenizer(args) -> int:
    from moe import data, tokenizer

    files = data.resolve_paths(tuple(args.inputs)) if args.inputs else data.stdlib_files()
    path = tokenizer.train(files, args.out, args.vocab_size)
    sp = tokenizer.load(str(path))
    print(f"trained {path} (vocab {sp.vocab_size()}) on {len(files)} files; "
          f"use it with data.tokenizer={path} model.vocab_size={sp.vocab_size()}")
    return 0


def cmd_plot(args) -> int:
    from moe import plot

    for path in plot.plot_run(args.run_dir):
        print(path)
    return 0


def cmd_aot(args) -> int:
    import os

    # compiling needs no TPU: let several processes load libtpu (CI, sweeps, a run on this host)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from moe import aot

    cfg = config_lib.load(args.config, args.overrides)
    try:
        report = aot.compile_for_topology(cfg, args.topology, args.slices)
    except aot.CompileError as e:
        print(f"moe aot: error: {e}", file=sys.stderr)
        return 1
    print(report.format())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.fits else 3


def cmd_plan(args) -> int:
    import os

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # the planner and its compiles each load libtpu
    from moe import plan as plan_lib

    result = plan_lib.plan(args.config, args.overrides, args.topology, args.batch, args.seq, args.jobs,
                           Path(args.cache_dir) if args.cache_dir else None, args.slices,
                           plan_lib.parse_fixed(args.fix))
    print(plan_lib.format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["best_command"] else 3


def cmd_bench(args) -> int:
    from moe import bench

    bench.main(args.quick, args.json, args.dtype)
    return 0


def cmd_sweep(args) -> int:
    from moe import sweep as sweep_lib

    sweep = sweep_lib.load(args.spec, args.runs_dir)
    runs = sweep_lib.select(sweep, args.only)
    if args.launcher != "local":
        sweep_lib.print_launches(sweep, runs, args.launcher)
        return 0
    try:
        failed = sweep_lib.run_local(sweep, runs, dry_run=args.dry_run)
    except KeyboardInterrupt as e:
        print(f"moe sweep: stopped: {e or 'interrupted'}; run the same command to resume", file=sys.stderr)
        return 130
    if failed:
        print(f"moe sweep: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from moe import report, sweep as sweep_lib

    for path in report.report(sweep_lib.load(args.spec, args.runs_dir), args.out):
        print(path)
    return 0


def _add_sweeps(sub) -> None:
    p = sub.add_parser("sweep", help="run a sweep spec here (resumable), or print its launch commands")
    p.add_argument("spec", help="a sweep spec, e.g. experiments/aux-coef/sweep.yaml")
    p.add_argument("--launcher", default="local", choices=["local", "tpu_vm", "xpk"],
                   help="local: train here, one run after another; tpu_vm, xpk: print the launch commands")
    p.add_argument("--dry-run", action="store_true", help="print the commands of unfinished runs only")
    p.add_argument("--only", nargs="+", default=None, help="run names or variants to run")
    p.add_argument("--runs-dir", default=None, help="where the runs go (default runs/sweeps/NAME)")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("report", help="markdown table and PNG plots of a sweep, next to its spec")
    p.add_argument("spec")
    p.add_argument("--runs-dir", default=None, help="where the runs are (default runs/sweeps/NAME)")
    p.add_argument("--out", default=None, help="output folder (default: the spec's folder)")
    p.set_defaults(func=cmd_report)


def _add_train_and_tools(sub) -> None:
    p = sub.add_parser("bench", help="MoE layer and train-step speed, MFU, and Hugging Face side by side")
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of the layer and train steps (bfloat16 on a GPU or TPU)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("aot", help="compile the train step for a TPU topology here; per-chip memory and FLOPs")
    _add_config_args(p)
    p.add_argument("--topology", required=True, help="e.g. v5p-128, v5e-16 or v5p:2x2x2 (needs the tpu extra)")
    p.add_argument("--slices", type=int, default=1,
                   help="multislice: this many slices over DCN (set the mesh.dcn_* sizes to match)")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    p.set_defaults(func=cmd_aot)
    p = sub.add_parser("plan", help="compile every mesh that divides a config and a TPU topology; a ranked table")
    _add_config_args(p)
    p.add_argument("--topology", required=True, help="e.g. v5p-128 (needs the tpu extra)")
    p.add_argument("--slices", type=int, default=1,
                   help="multislice: this many slices of the topology over DCN (data / fsdp cross them)")
    p.add_argument("--fix", action="append", default=[], metavar="AXIS=N",
                   help="hold a mesh axis at a size (repeatable), e.g. --fix tensor=1 --fix data=1")
    p.add_argument("--batch", type=int, default=None, help="train.batch_size (sequences per step)")
    p.add_argument("--seq", type=int, default=None, help="train.seq_len")
    p.add_argument("--jobs", type=int, default=2, help="compiles in parallel (each takes a core and its memory)")
    p.add_argument("--json", default=None, help="also write the ranked plans to this JSON file")
    p.add_argument("--cache-dir", default=None, help="compiled reports (default ~/.cache/moe/plans or $MOE_PLAN_CACHE)")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("train", help="train (or resume) a run")
    _add_config_args(p)
    p.add_argument("--run-dir", required=True, help="run directory; an existing one is resumed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("tokenizer", help="sentencepiece tokenizers")
    tsub = p.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("train", help="train a BPE sentencepiece model on a corpus")
    t.add_argument("inputs", nargs="*", help="files, directories or globs (default: the stdlib corpus)")
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--out", required=True, help="output prefix; writes PREFIX.model and PREFIX.vocab")
    t.set_defaults(func=cmd_tokenizer)
    p = sub.add_parser("plot", help="PNG plots of a run: losses and per-layer expert load")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_plot)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints to and from Hugging Face")
    directions = p.add_subparsers(dest="direction", required=True)
    a = directions.add_parser("from-hf", help="HF folder -> OUT_DIR/params (Orbax) + OUT_DIR/config.yaml")
    a.add_argument("src", metavar="HF_DIR")
    a.add_argument("out", metavar="OUT_DIR")
    a.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="stored param dtype (auto: as in the HF checkpoint)")
    b = directions.add_parser("to-hf", help="our checkpoint -> HF folder (config.json, safetensors)")
    b.add_argument("src", metavar="CKPT_DIR")
    b.add_argument("out", metavar="OUT_DIR")
    b.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    b.add_argument("--max-shard-size", default="5GB")
    b.add_argument("--tokenizer", default=None,
                   help="a sentencepiece model to copy as tokenizer.model, or 'mistral-v1'")
    p.set_defaults(func=cmd_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="total and active parameter counts, from shapes alone")
    _add_config_args(p)
    p.add_argument("--quant", metavar="FMT", help="also the weights' bytes quantized as int8, int4, nf4 or nf4-dq "
                   "(beside the other formats), from the config's quant.include / exclude")
    p.set_defaults(func=cmd_params)
    _add_convert(sub)
    _add_train_and_tools(sub)
    _add_sweeps(sub)
    from moe.infer import commands as infer_commands

    infer_commands.add_parsers(sub)
    from moe.tune import commands as tune_commands

    tune_commands.add_parsers(sub)
    from moe.quant import commands as quant_commands

    quant_commands.add_parsers(sub)
    from moe.convert import upcycle

    upcycle.add_parser(sub)
    from moe import analyze

    analyze.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from moe import platform

    platform.quiet_without_tpu()  # before JAX loads: no libtpu noise on hosts without TPUs
    # A process's own command line re-runs itself with huge-page malloc on CPU hosts, before the
    # parser imports JAX; `moe bench` keeps the environment it is given, so that Hugging Face's
    # step beside ours runs in the same one (the top-level parser has no options: argv[1] is
    # the command).
    if argv is None and sys.argv[1:2] != ["bench"]:
        platform.rerun_with_hugepage_malloc()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides may come after options: moe train CFG --run-dir D a.b=c
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except config_lib.ConfigError as e:
        print(f"moe {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # ConversionError and bad inputs
        print(f"moe {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
