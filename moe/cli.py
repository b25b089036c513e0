"""The `moe` command: `moe SUBCOMMAND ...` (also `python -m moe`)."""

from __future__ import annotations

import argparse
import sys

from moe import config as config_lib


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML config file, e.g. configs/tiny-moe.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_experts=4")


def cmd_params(args) -> int:
    from moe.params import count_params, format_count

    cfg = config_lib.load(args.config, args.overrides)
    print(format_count(cfg.model, count_params(cfg.model)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="total and active parameter counts, from shapes alone")
    _add_config_args(p)
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except config_lib.ConfigError as e:
        print(f"moe {args.command}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
