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
    from moe.serve.app import create_app
    from moe.serve.engine import Engine, EngineError

    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be in [1, 65535], got {args.port}")
    src = source_lib.load(args.source, args.dtype, args.tokenizer)
    sp = tokenizer_lib.load(src.tokenizer)
    try:
        engine = Engine(src.model, src.params, rows=args.max_batch, max_seq_len=args.max_seq_len)
    except EngineError as e:
        raise UsageError(str(e)) from None
    model_id = args.model_name or src.path.name
    app = create_app(engine, sp, src.tokenizer, model_id, api_key=args.api_key)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    logging.info(
        "serving %s as %r on http://%s:%d/v1 (%d rows)", src.path, model_id, args.host, args.port, args.max_batch
    )
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


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("source", help="a Hugging Face folder, converted folder, run directory or checkpoint step")
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
