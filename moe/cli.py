"""The `moe` command: `moe SUBCOMMAND ...` (also `python -m moe`).

Each subpackage that owns commands adds them with its commands.add_parsers and imports a
command's code only when it runs, so `moe --help` does not load JAX. Conventions shared by
every command: positional SOURCE / OUT where a command transforms a checkpoint; `--out` for
where a report goes (a file where it is one JSON, a folder where it is several files);
`key=value` config overrides after the config wherever one is read; choices on every flag
that takes one of a closed set.
"""

from __future__ import annotations

import argparse
import sys

from moe import config as config_lib
from moe import platform, progress
from moe.bench import commands as bench_commands
from moe.convert import commands as convert_commands
from moe.data import commands as data_commands
from moe.infer import commands as infer_commands
from moe.plan import commands as plan_commands
from moe.quant import commands as quant_commands
from moe.serve import commands as serve_commands
from moe.study import commands as study_commands
from moe.training import commands as training_commands
from moe.tune import commands as tune_commands

# in the order `moe --help` lists them
COMMANDS = (
    training_commands,
    plan_commands,
    convert_commands,
    data_commands,
    infer_commands,
    serve_commands,
    tune_commands,
    quant_commands,
    study_commands,
    bench_commands,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for commands in COMMANDS:
        commands.add_parsers(sub)
    _add_no_progress(parser)
    return parser


def _add_no_progress(parser: argparse.ArgumentParser) -> None:
    """--no-progress on every command (progress bars show only on a terminal anyway)."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        if "--no-progress" not in parser._option_string_actions:
            parser.add_argument("--no-progress", action="store_true", help="no progress bars")
        return
    for child in dict.fromkeys(subparsers[0].choices.values()):  # aliases share a parser
        _add_no_progress(child)


def main(argv: list[str] | None = None) -> int:
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
    progress.set_wanted(not getattr(args, "no_progress", False))
    try:
        return args.func(args)
    except config_lib.ConfigError as e:
        print(f"moe {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # ConversionError and bad inputs
        print(f"moe {args.command}: error: {e}", file=sys.stderr)
        return 1
