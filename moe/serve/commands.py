"""`moe serve SOURCE`: the OpenAI-compatible server (moe/serve/app.py) on one engine."""

from __future__ import annotations

import logging
import signal
import sys

from moe.infer.commands import UsageError


def run_serve(args) -> int:
    import uvicorn

    from moe.data import tokenizer as tokenizer_lib
    from moe.infer import source as source_lib
    from moe.serve import adapters as adapters_lib
    from moe.serve.app import create_app
    from moe.serve.engine import Engine, EngineError

    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be in [1, 65535], got {args.port}")
    named = _adapter_flags(args.adapter)
    src = source_lib.load(args.source, args.dtype, args.tokenizer)
    sp = tokenizer_lib.load(src.tokenizer)
    model_id = args.model_name or src.path.name
    if model_id in named:
        raise UsageError(f"--adapter {model_id}: the base is served as {model_id!r}; name the adapter otherwise")
    try:
        adapters = [adapters_lib.load(name, path, src.model, src.params) for name, path in named.items()]
        engine = Engine(src.model, src.params, args.max_batch, args.max_seq_len, adapters)
    except (EngineError, adapters_lib.AdapterError) as e:
        raise UsageError(str(e)) from None
    app = create_app(engine, sp, src.tokenizer, model_id, api_key=args.api_key)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    logging.info(
        "serving %s as %r on http://%s:%d/v1 (%d rows)", src.path, model_id, args.host, args.port, args.max_batch
    )
    for adapter in adapters:
        logging.info("adapter %r: %s (rank %d)", adapter.name, adapter.path, adapter.rank)
    logging.info("compiling the engine's programs (%d decode row counts)", len(engine.buckets))
    engine.warm_up()
    engine.start()
    # uvicorn stops accepting on SIGTERM and lets open requests finish for up to the grace
    # period, then raises the signal again under the handler it found: this one, so a SIGTERM
    # ends the process normally (exit 0) once the engine has stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.grace_period)
        uvicorn.Server(config).run()
    finally:
        engine.stop(timeout=args.grace_period)
    print("moe serve: stopped", file=sys.stderr)
    return 0


def _adapter_flags(flags: list[str] | None) -> dict[str, str]:
    """{name: path} from --adapter NAME=PATH flags."""
    named = {}
    for flag in flags or []:
        name, sep, path = flag.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--adapter {flag}: give NAME=PATH (a LoRA run, a checkpoint step or a PEFT folder)")
        if name in named:
            raise UsageError(f"--adapter {name} is given twice; give each adapter its own name")
        named[name] = path
    return named


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("source", help="a Hugging Face folder, converted folder, run directory or checkpoint step")
    p.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=PATH",
        help="serve a LoRA run, checkpoint step or PEFT folder unmerged as model NAME (repeatable)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="decode rows: requests generating at once")
    p.add_argument(
        "--max-seq-len", type=int, default=None, help="prompt + completion tokens (default: model.max_seq_len)"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tokenizer", default=None, help="a sentencepiece .model or 'mistral-v1' (default: the source's)")
    p.add_argument("--model-name", default=None, help="the model id clients name (default: the source folder's name)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/ requests")
    p.add_argument("--grace-period", type=float, default=30.0, help="seconds open requests get after SIGTERM")
    p.set_defaults(func=run_serve)
