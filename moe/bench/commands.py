"""`moe bench`: MoE layer, train-step and decoding speed beside Hugging Face, in one run."""

from __future__ import annotations


def run_bench(args) -> int:
    if args.serve:
        import json
        from pathlib import Path

        from moe.bench import serve

        result = serve.run(args.serve, per_client=2 if args.quick else 4)
        print(serve.format_table(result))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    from moe.bench import training

    training.main(args.quick, args.out, args.dtype)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="MoE layer and train-step speed, MFU, and Hugging Face side by side")
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument(
        "--serve",
        nargs="?",
        const="tiny-moe",
        default=None,
        metavar="CONFIG",
        help="instead: the serving engine under 1, 8 and 32 clients beside generate (default config: tiny-moe)",
    )
    p.add_argument(
        "--out", "--json", dest="out", default=None, metavar="FILE", help="also write the numbers to this JSON file"
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype of the layer and train steps (bfloat16 on a GPU or TPU)",
    )
    p.set_defaults(func=run_bench)
