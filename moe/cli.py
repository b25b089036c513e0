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
    p.set_defaults(func=cmd_params)
    _add_convert(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
