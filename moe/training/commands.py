"""`moe train`: arguments and what they run (the loop itself is moe/training/loop.py).

JAX is imported only when the command runs, so `moe --help` stays fast.
"""

from __future__ import annotations

import logging
import sys

from moe import config as config_lib
from moe import storage


def run_train(args) -> int:
    from moe.training import loop

    storage.location(args.run_dir)  # a malformed gs:// URL: one line, before anything else
    cfg = config_lib.load(args.config, args.overrides)
    console = logging.StreamHandler()
    console.setLevel(logging.DEBUG if args.verbose else logging.INFO)  # DEBUG: the whole resolved config
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=[console], force=True)
    try:
        record = loop.run(cfg, args.run_dir, progress=not args.no_progress)
    except loop.TrainingError as e:
        print(f"moe train: {e}", file=sys.stderr)
        return 1
    if record:
        print(f"step {record['step']}: loss {record['loss']:.4f} -> {args.run_dir}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train (or resume) a run")
    config_lib.add_cli_args(p)
    p.add_argument("--run-dir", required=True, help="run directory, local or gs://; an existing one is resumed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="also print the whole resolved config")
    p.set_defaults(func=run_train)
