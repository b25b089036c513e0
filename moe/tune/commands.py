"""`moe lora merge`, `moe lora export` and `moe compare`: arguments and what they run.

Outputs are written to a temporary folder or file first and renamed when complete, so a
failure leaves nothing half-written. JAX is imported only when a command runs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from moe import storage


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _fresh_tmp(out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")  # `out/` and `out` alike
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def run_merge(args) -> int:
    from moe.tune.merge import merge_run

    out = Path(args.out)
    tmp = _fresh_tmp(out)
    tmp.mkdir(parents=True)
    cfg, step = merge_run(args.source, tmp)
    _publish(tmp, out)
    print(f"merged {step} (rank {cfg.lora.rank}, targets {', '.join(cfg.lora.targets)}) -> {out}")
    return 0


def run_export(args) -> int:
    from moe.tune import peft_export
    from moe.tune.merge import lora_run

    cfg, adapters, step = lora_run(args.source)
    out = Path(args.out)
    tmp = _fresh_tmp(out)
    peft_export.export(cfg, adapters, tmp, base_model=args.base_model or cfg.train.init_from or "")
    _publish(tmp, out)
    print(f"exported the adapters of {step} as a PEFT adapter -> {out}")
    return 0


def run_compare(args) -> int:
    from moe.tune.compare import compare

    result = compare(args.a, args.b, args.judge, args.references)
    result.update(a=args.a, b=args.b, judge=args.judge)
    rate = result["win_rate"]
    print(
        f"A {args.a} vs B {args.b}, judge {args.judge}, {result['n']} prompts: "
        f"{result['wins']} wins / {result['ties']} ties / {result['losses']} losses; win rate "
        f"{'n/a' if rate is None else f'{rate:.3f}'} without ties, {result['win_rate_ties_half']:.3f} with ties "
        f"as half (95% bootstrap {result['interval_95'][0]:.3f}-{result['interval_95'][1]:.3f})"
        + (
            f"; exact-match accuracy A {result['accuracy_a']:.3f}, B {result['accuracy_b']:.3f}"
            if "accuracy_a" in result
            else ""
        )
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_parsers(sub) -> None:
    lora = sub.add_parser("lora", help="a LoRA run's adapters: merged into the weights, or as a PEFT adapter")
    actions = lora.add_subparsers(dest="action", required=True)
    p = actions.add_parser("merge", help="W + scale * A B into a plain checkpoint (params/ + config.yaml)")
    p.add_argument("source", metavar="RUN_OR_STEP")
    p.add_argument("out", metavar="OUT", type=storage.out_dir)
    p.set_defaults(func=run_merge)
    p = actions.add_parser("export", help="adapter_config.json + adapter_model.safetensors for PEFT")
    p.add_argument("source", metavar="RUN_OR_STEP")
    p.add_argument("out", metavar="OUT", type=storage.out_dir)
    p.add_argument("--base-model", default=None, help="base_model_name_or_path to record (default: init_from)")
    p.set_defaults(func=run_export)
    p = sub.add_parser("compare", help="two models' answers judged pairwise: wins, ties, losses, win rates")
    p.add_argument("a", metavar="A.jsonl")
    p.add_argument("b", metavar="B.jsonl")
    p.add_argument("--judge", default="exact", help="exact, f1 or cmd:COMMAND (prints A, B or tie)")
    p.add_argument("--references", default=None, help='JSONL of {"prompt", "answer"} for exact and f1')
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    p.set_defaults(func=run_compare)
