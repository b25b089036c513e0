"""`moe sweep`, `moe report`, `moe plot`, `moe analyze` and `moe experts prune|merge`:
arguments and what they run.

A command's code is imported when it runs, so `moe --help` does not load JAX.
"""

from __future__ import annotations

import sys

from moe import storage

DEFAULT_DOMAINS = ("tests=test", "asyncio=asyncio", "email=email", "encodings=encodings", "tkinter=tkinter")


def run_sweep(args) -> int:
    from moe.study import sweep as sweep_lib

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


def run_report(args) -> int:
    from moe.study import report
    from moe.study import sweep as sweep_lib

    for path in report.report(sweep_lib.load(args.spec, args.runs_dir), args.out):
        print(path)
    return 0


def run_plot(args) -> int:
    from moe.study import plot

    for path in plot.plot_run(args.run_dir):
        print(path)
    return 0


def run_analyze(args) -> int:
    from moe.study import routing

    result = routing.analyze(
        args.source, args.data or list(DEFAULT_DOMAINS), args.out, args.layers, args.docs, args.doc_tokens, args.dtype
    )
    print(routing.summary(result))
    print(f"wrote {args.out}/analysis.json, analysis.md, load_layer*.png, tokens.html, tokens_layer*.png")
    return 0


def run_experts(args) -> int:
    from moe.study import surgery

    record = surgery.run(args.method, args.source, args.out, args.keep, args.data, args.by, args.docs, args.doc_tokens)
    print(surgery.summary(record))
    print(f"wrote {args.out} ({args.keep} experts per layer; surgery.json records the choice)")
    return 0


def _add_experts(sub) -> None:
    p = sub.add_parser("experts", help="expert surgery: prune or merge an MoE's experts by how it routes given texts")
    methods = p.add_subparsers(dest="method", required=True)
    for method, help_text, count in (
        ("prune", "keep the K experts per layer with the most routing weight (or load)", "--keep"),
        ("merge", "merge each layer's experts into K groups by router similarity (MC-SMoE)", "--to"),
    ):
        q = methods.add_parser(method, help=help_text)
        q.add_argument("source", help="an MoE: run directory, checkpoint step, converted or HF folder")
        q.add_argument("out", type=storage.out_dir, help="the new checkpoint folder (must not exist)")
        q.add_argument(count, dest="keep", type=int, required=True, metavar="K", help="experts per layer afterwards")
        q.add_argument(
            "--data",
            required=True,
            help="texts to route: comma-separated files, folders or globs (relative names also under the stdlib)",
        )
        if method == "prune":
            q.add_argument("--by", default="weight", choices=["weight", "load"], help="what an expert is ranked by")
        else:
            q.set_defaults(by="load")
        q.add_argument("--docs", type=int, default=32, help="documents read from the data")
        q.add_argument("--doc-tokens", type=int, default=256, help="tokens read from the beginning of each document")
        q.set_defaults(func=run_experts)


def add_parsers(sub) -> None:
    p = sub.add_parser("sweep", help="run a sweep spec here (resumable), or print its launch commands")
    p.add_argument(
        "spec", help="a sweep spec file (experiments/aux-coef/sweep.yaml) or a shipped one by name (aux-coef)"
    )
    p.add_argument(
        "--launcher",
        default="local",
        choices=["local", "tpu_vm", "xpk"],
        help="local: train here, one run after another; tpu_vm, xpk: print the launch commands",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands of unfinished runs only")
    p.add_argument("--only", nargs="+", default=None, help="run names or variants to run")
    p.add_argument("--runs-dir", default=None, help="where the runs go (default runs/sweeps/NAME)")
    p.set_defaults(func=run_sweep)
    p = sub.add_parser("report", help="markdown table and PNG plots of a sweep, next to its spec")
    p.add_argument("spec", help="the sweep spec (a file or a shipped name)")
    p.add_argument("--runs-dir", default=None, help="where the runs are (default runs/sweeps/NAME)")
    p.add_argument(
        "--out", default=None, metavar="DIR", type=storage.out_dir, help="output folder (default: the spec's folder)"
    )
    p.set_defaults(func=run_report)
    p = sub.add_parser("plot", help="PNG plots of a run: losses and per-layer expert load")
    p.add_argument("run_dir")
    p.set_defaults(func=run_plot)
    p = sub.add_parser(
        "analyze", help="router analysis: expert load per domain, consecutive-token repeat rates, token-colored samples"
    )
    p.add_argument("source", help="an MoE: run directory, checkpoint step, converted or HF folder")
    p.add_argument(
        "--data",
        nargs="*",
        default=[],
        help="NAME=PATHS domains (comma-separated files, folders, "
        "globs; relative names also under the stdlib); default: " + " ".join(DEFAULT_DOMAINS),
    )
    p.add_argument("--layers", type=int, nargs="*", help="layers to report (default: all)")
    p.add_argument("--docs", type=int, default=16, help="documents per domain")
    p.add_argument("--doc-tokens", type=int, default=256, help="tokens read from the beginning of each document")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", required=True, metavar="DIR", type=storage.out_dir, help="the folder for the outputs")
    p.set_defaults(func=run_analyze)
    _add_experts(sub)
