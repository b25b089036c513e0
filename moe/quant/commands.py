"""`moe quantize SOURCE OUT --format FMT`: arguments and what they run (the streamed writing
is moe/quant/store.py's `quantize_checkpoint`). Its code is imported when it runs, so
`moe --help` does not load JAX."""

from __future__ import annotations

from moe import storage
from moe.config import QUANT_FORMATS


def run_quantize(args) -> int:
    from moe.quant.store import quantize_checkpoint

    sizes = quantize_checkpoint(args.source, args.out, args.format, args.include, args.exclude, args.block_size)
    print(
        f"quantized {args.source} -> {args.out} ({args.format}): {sizes['source_bytes'] / 1e9:.3f} GB -> "
        f"{sizes['bytes'] / 1e9:.3f} GB ({sizes['bytes'] / max(sizes['source_bytes'], 1):.3f}x)"
    )
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("quantize", help="a quantized checkpoint (int8, int4, nf4, nf4-dq), streamed tensor by tensor")
    p.add_argument("source", help="HF folder, `moe convert from-hf` output, run directory or checkpoint step")
    p.add_argument("out", type=storage.out_dir, help="the new folder: params/ + config.yaml")
    p.add_argument("--format", required=True, choices=QUANT_FORMATS, help="the weights' format")
    p.add_argument(
        "--include",
        nargs="*",
        help="weight paths to quantize (fnmatch; default layers/*: every "
        "matmul weight in the layers, experts and router included)",
    )
    p.add_argument("--exclude", nargs="*", default=[], help="weight paths to keep (fnmatch), e.g. layers/moe/gate")
    p.add_argument("--block-size", type=int, default=64, help="elements per scale block (int4, nf4)")
    p.set_defaults(func=run_quantize)
