"""`moe convert from-hf|to-hf` and `moe upcycle`: arguments and what they run.

A command's code is imported when it runs, so `moe --help` does not load JAX.
"""

from __future__ import annotations

from moe import storage


def run_convert(args) -> int:
    from moe import convert

    if args.direction == "from-hf":
        cfg = convert.convert_from_hf(args.src, args.out, dtype=args.dtype)
    else:
        cfg = convert.convert_to_hf(
            args.src, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, tokenizer=args.tokenizer
        )
    kind = "Mixtral" if cfg.is_moe else "Mistral"
    print(f"converted {kind} ({cfg.n_layers} layers, d_model {cfg.d_model}) {args.src} -> {args.out}")
    return 0


def run_upcycle(args) -> int:
    from moe.convert.upcycle import upcycle

    cfg = upcycle(args.source, args.moe_config, args.out, args.overrides, args.router_init, args.noise, args.seed)
    m = cfg.model
    print(
        f"upcycled {args.source} -> {args.out}: {m.n_experts} experts, top-{m.top_k}, router {args.router_init}"
        + (f", expert noise std {args.noise} (seed {args.seed})" if args.noise else ", experts identical")
    )
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints to and from Hugging Face")
    directions = p.add_subparsers(dest="direction", required=True)
    a = directions.add_parser("from-hf", help="HF folder -> OUT/params (Orbax) + OUT/config.yaml")
    a.add_argument("src", metavar="HF_DIR")
    a.add_argument("out", metavar="OUT", type=storage.out_dir)
    a.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="stored param dtype (auto: as in the HF checkpoint)",
    )
    b = directions.add_parser("to-hf", help="our checkpoint -> HF folder (config.json, safetensors)")
    b.add_argument(
        "src", metavar="SOURCE", help="a run directory (its newest checkpoint), a checkpoint step or a converted folder"
    )
    b.add_argument("out", metavar="OUT", type=storage.out_dir)
    b.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    b.add_argument("--max-shard-size", default="5GB")
    b.add_argument(
        "--tokenizer",
        default=None,
        help="a sentencepiece .model or 'mistral-v1' (default: the converted folder's or the run's own)",
    )
    p.set_defaults(func=run_convert)
    p = sub.add_parser("upcycle", help="a dense checkpoint into an MoE of the same shape (sparse upcycling)")
    p.add_argument("source", help="dense: HF Mistral folder, `moe convert from-hf` output, run or checkpoint step")
    p.add_argument("moe_config", help="the MoE's config (same architecture but n_experts / top_k)")
    p.add_argument("out", type=storage.out_dir, help="the new folder: params/ + config.yaml (a train.init_from source)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the MoE config")
    p.add_argument(
        "--router-init",
        default="zeros",
        choices=("zeros", "normal"),
        help="the new router: zeros (every expert equally likely) or normal(0, init_std)",
    )
    p.add_argument("--noise", type=float, default=0.0, help="std of Gaussian noise added to each expert's weights")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_upcycle)
