"""Expert surgery on a trained MoE: held-out perplexity against the experts kept per layer,
for `moe experts prune` and `moe experts merge`, before and after a short recovery
fine-tune (the source itself fine-tuned the same way is the control).

    python experiments/moe-variants/surgery.py SOURCE_RUN NAME --keep 6 4 2 [--recover-steps 50] [--recover-lr 3e-4]

Every step is a `moe` command (printed as it runs), so each number can be reproduced by
hand: the surgery outputs and recovery runs go to runs/surgery/NAME/, the results to
experiments/moe-variants/surgery-NAME.json and .md. Rerunning skips what is already there.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = "json,email,asyncio,unittest,collections"  # stdlib packages the router statistics are measured on


def moe(*args: str) -> None:
    command = [sys.executable, "-m", "moe", *args, "--no-progress"]
    print("$ moe", " ".join(args), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def perplexity(source: Path, out: Path) -> float:
    if not (out / "perplexity.json").is_file():
        moe("eval", str(source), "--perplexity", "--out", str(out))
    return json.loads((out / "perplexity.json").read_text())["perplexity"]


def recovered(source: Path, config: Path, experts: int, steps: int, lr: float) -> Path:
    run = source.parent / f"{source.name}-recovered-lr{lr:g}"
    overrides = [
        f"model.n_experts={experts}",
        f"train.init_from={source}",
        f"train.steps={steps}",
        f"train.lr={lr:g}",
        "train.warmup_steps=5",
        f"train.eval_every={steps}",
        f"checkpoint.every_steps={steps}",
    ]
    moe("train", str(config), "--run-dir", str(run), *overrides)  # resumes or skips a finished run
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a trained MoE run")
    parser.add_argument("name", help="a name for the outputs")
    parser.add_argument("--keep", type=int, nargs="+", required=True, help="experts per layer to keep")
    parser.add_argument("--recover-steps", type=int, default=50)
    parser.add_argument("--recover-lr", type=float, default=3e-4, help="peak learning rate of the recovery runs")
    args = parser.parse_args()
    root = Path("runs/surgery") / args.name
    root.mkdir(parents=True, exist_ok=True)
    config = args.source / "config.yaml"
    experts = _experts(config)
    steps, lr = args.recover_steps, args.recover_lr
    control = recovered(_copy_of(args.source, root), config, experts, steps, lr)
    rows = [
        {
            "method": "none",
            "experts": experts,
            "before": perplexity(args.source, root / "source.eval"),
            "after": perplexity(control, root / f"{control.name}.eval"),
        }
    ]
    for method, flag in (("prune", "--keep"), ("merge", "--to")):
        for k in args.keep:
            out = root / f"{method}-{k}"
            if not out.exists():
                moe("experts", method, str(args.source), str(out), flag, str(k), "--data", DATA)
            run = recovered(out, config, k, steps, lr)
            after = perplexity(run, root / f"{run.name}.eval")
            rows.append(
                {"method": method, "experts": k, "before": perplexity(out, root / f"{method}-{k}.eval"), "after": after}
            )
    result = {"source": str(args.source), "data": DATA, "recover_steps": steps, "recover_lr": lr, "rows": rows}
    (HERE / f"surgery-{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Recovery: {steps} steps of `{config}`'s batches at peak lr {lr:g} (warmup 5, cosine), fresh Adam state.",
        "",
        "| surgery | experts per layer | perplexity | after recovery |",
        "|---|---|---|---|",
        *[f"| {r['method']} | {r['experts']} | {r['before']:.2f} | {r['after']:.2f} |" for r in rows],
    ]
    (HERE / f"surgery-{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _experts(config: Path) -> int:
    from moe import config as config_lib

    return config_lib.load(config).model.n_experts


def _copy_of(source: Path, root: Path) -> Path:
    """The source's newest checkpoint under root/source, so the control's recovery run sits
    beside the others (a symlink: nothing copied)."""
    link = root / "source"
    if not link.exists():
        link.symlink_to(source.resolve())
    return link


if __name__ == "__main__":
    main()
