"""`moe generate`, `moe eval` and `moe passkey-corpus`: their arguments and what they run.

Everything is checked before anything is written; every error is a ValueError whose message
names the fix (moe/cli.py prints it on one line). JAX is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from moe import storage


class UsageError(ValueError):
    """A bad command line or input file; the message names the fix."""


def _write_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_prompts(path: str) -> list[str]:
    from moe.data.pipeline import read_jsonl

    try:
        prompts = [row["prompt"] for row in read_jsonl(path, ("prompt",), UsageError)]
    except OSError as e:
        raise UsageError(f"cannot read --prompts {path}: {e.strerror}") from None
    if not prompts:
        raise UsageError(f"{path} holds no prompts")
    return prompts


def chat_ids(text: str, tokenizer: str) -> list[int]:
    """Mistral's instruct template ([INST] ... [/INST]) through mistral-common, on the
    model's own sentencepiece model (moe/data/chat.py, as chat fine-tuning renders it)."""
    from moe.data import chat

    return chat.encode_prompt(chat.tokenizer_path(tokenizer), [{"role": "user", "content": text}])


def _sampling_args(args) -> dict:
    from moe.infer.sampling import Sampling

    Sampling(args.temperature, args.top_k, args.top_p)  # refuse bad settings before loading anything
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def run_generate(args) -> int:
    from moe.data import tokenizer as tokenizer_lib
    from moe.infer import source as source_lib
    from moe.infer.decode import generate

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if (args.prompt is None) == (args.prompts is None):
        raise UsageError("give exactly one of --prompt TEXT or --prompts FILE.jsonl")
    sampling = _sampling_args(args)
    texts = [args.prompt] if args.prompt is not None else _read_prompts(args.prompts)
    src = source_lib.load(args.source, args.dtype, args.tokenizer)
    sp = tokenizer_lib.load(src.tokenizer)
    ids = [chat_ids(t, src.tokenizer) if args.chat else [sp.bos_id(), *sp.encode(t)] for t in texts]
    cfg = src.model
    if args.prompt is not None:
        return _stream_one(cfg, src.params, ids[0], sp, args, sampling)
    outs = generate(cfg, src.params, ids, args.max_new_tokens, batch_size=args.batch_size, **sampling)
    lines = []
    for text, prompt_ids, out in zip(texts, ids, outs):
        finish = "eos" if out and out[-1] == cfg.eos_id else "length"
        body = [t for t in out if t != cfg.eos_id]
        lines.append(
            json.dumps(
                {
                    "prompt": text,
                    "completion": sp.decode(body),
                    "tokens": out,
                    "prompt_tokens": len(prompt_ids),
                    "finish_reason": finish,
                }
            )
        )
    if args.out:
        _write_atomic(args.out, "\n".join(lines) + "\n")
        print(f"wrote {len(lines)} completions to {args.out}", file=sys.stderr)
    else:
        print("\n".join(lines))
    return 0


def _stream_one(cfg, params, prompt_ids, sp, args, sampling) -> int:
    from moe.infer.decode import generate

    produced: list[int] = []
    shown = [""]

    def on_tokens(step, tokens):
        token = int(tokens[0])
        if token < 0 or token == cfg.eos_id:
            return
        produced.append(token)
        text = sp.decode(produced)
        sys.stdout.write(text[len(shown[0]) :])
        sys.stdout.flush()
        shown[0] = text

    if not args.chat:
        sys.stdout.write(sp.decode(prompt_ids[1:]))
    generate(cfg, params, [prompt_ids], args.max_new_tokens, stream=on_tokens, **sampling)
    sys.stdout.write("\n")
    return 0


def run_eval(args) -> int:
    from moe.data import tokenizer as tokenizer_lib
    from moe.infer import source as source_lib

    if args.perplexity is None and not args.passkey and not args.tasks:
        raise UsageError("choose what to measure: --perplexity [PATHS], --passkey and/or --tasks NAMES")
    src = source_lib.load(args.source, args.dtype, args.tokenizer)
    sp = tokenizer_lib.load(src.tokenizer)
    out = Path(args.out) if args.out else None
    if args.perplexity is not None:
        _perplexity(src, sp, args, out)
    if args.passkey:
        _passkey(src, sp, args, out)
    if args.tasks:
        _harness(src, sp, args, out)
    return 0


def _harness(src, sp, args, out) -> None:
    # lm-eval loads only when asked for: it pulls in torch and datasets
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from moe.infer.harness import MoeLM

    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in args.tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"--tasks: unknown task(s) {unknown}; add the folder of their YAML with --include-path")
    lm = MoeLM(src.model, src.params, sp, batch_size=args.batch_size)
    results = evaluator.simple_evaluate(
        model=lm, tasks=args.tasks, num_fewshot=args.num_fewshot, limit=args.limit, task_manager=manager
    )
    print(make_table(results))
    if out:
        summary = {k: results[k] for k in ("results", "configs", "versions", "n-shot") if k in results}
        _write_atomic(out / "lm_eval_results.json", json.dumps(summary, indent=2, default=str) + "\n")


def _eval_texts(src, paths: list[str]) -> list[str]:
    from moe.data import pipeline as data

    cfg = src.config
    try:
        if paths:
            cfg_data = dataclasses.replace(cfg.data, paths=tuple(paths), format="auto")
            docs = data.DocumentSource(
                data.locate_documents(data.resolve_paths(tuple(paths)), cfg_data), cfg.data.text_field
            )
        else:  # the held-out split of the source's configured corpus
            docs = data.split_documents(cfg.data)[1]
    except (data.DataError, OSError, ValueError) as e:
        raise UsageError(f"--perplexity: {e}") from None
    return [docs[i] for i in range(len(docs))]


def _perplexity(src, sp, args, out) -> None:
    from moe.infer import perplexity

    context = args.context or min(src.model.max_seq_len, 4096)
    stride = args.stride or context
    if not 1 <= stride <= context:
        raise UsageError(f"--stride must be in [1, --context={context}], got {stride}")
    if src.model.sliding_window is None and context > src.model.max_seq_len:
        raise UsageError(f"--context {context} exceeds model.max_seq_len ({src.model.max_seq_len})")
    texts = _eval_texts(src, args.perplexity)
    result = perplexity.evaluate(
        src.model, src.params, texts, sp, context=context, stride=stride, batch_size=args.batch_size
    )
    result["source"] = str(src.path)
    print(perplexity.format_table(result))
    if out:
        _write_atomic(out / "perplexity.json", json.dumps(result, indent=2) + "\n")


def _passkey(src, sp, args, out) -> None:
    from moe.infer import passkey

    room = src.model.max_seq_len - passkey.ANSWER_TOKENS
    too_long = [n for n in args.lengths if src.model.sliding_window is None and n > room]
    if too_long:
        raise UsageError(
            f"--lengths {too_long} leave no room for the answer within model.max_seq_len "
            f"({src.model.max_seq_len}) of a model without a sliding window; use lengths up to {room}"
        )
    shortest = passkey.Sizer.of(sp).fixed
    if min(args.lengths) < shortest:
        raise UsageError(f"--lengths below {shortest} tokens cannot hold the instruction, key and question")
    if any(not 0 <= d <= 1 for d in args.depths):
        raise UsageError(f"--depths must be fractions in [0, 1], got {args.depths}")
    records = passkey.evaluate(
        src.model, src.params, sp, args.lengths, args.depths, args.trials, args.seed, args.batch_size
    )
    table = passkey.format_table(records)
    print(table)
    if out:
        _write_atomic(out / "passkey.json", json.dumps(records, indent=1) + "\n")
        _write_atomic(out / "passkey.md", table + "\n")
        passkey.plot_heatmap(records, out / "passkey.png", f"passkey retrieval: {src.path.name}")


def run_passkey_corpus(args) -> int:
    from moe.data import tokenizer as tokenizer_lib
    from moe.infer import passkey

    path = passkey.write_corpus(tokenizer_lib.load(args.tokenizer), args.out, args.docs, args.max_tokens, args.seed)
    print(f"wrote {args.docs} passkey texts of up to {args.max_tokens} tokens to {path}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        help="a Hugging Face folder, a `moe convert from-hf` output, a run directory "
        "(its newest checkpoint) or a checkpoint step directory",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="params and compute dtype (float32 is the fast one on CPU)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="a sentencepiece .model or 'mistral-v1' (default: the source's tokenizer.model, else its config's)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")


def add_parsers(sub) -> None:
    p = sub.add_parser("generate", help="sample from a model: stream one prompt, or a JSONL file of prompts")
    _common(p)
    p.add_argument("--prompt", default=None, help="one prompt; the completion streams to stdout")
    p.add_argument("--prompts", default=None, help='a JSONL file of {"prompt": ...} lines')
    p.add_argument("--out", default=None, help="with --prompts: write the JSONL here (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap prompts in Mistral's instruct template")
    p.set_defaults(func=run_generate)
    p = sub.add_parser("eval", help="perplexity / bits per byte, and passkey retrieval")
    _common(p)
    p.add_argument(
        "--perplexity",
        nargs="*",
        default=None,
        metavar="PATHS",
        help="text files, folders, globs or JSONL (default: the held-out split of the configured corpus)",
    )
    p.add_argument("--context", type=int, default=None, help="tokens per window (default: max_seq_len, at most 4096)")
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between windows (default: --context, disjoint; smaller: more history per token, slower)",
    )
    p.add_argument("--passkey", action="store_true", help="the passkey retrieval grid (greedy, exact digits)")
    p.add_argument("--tasks", nargs="+", default=None, metavar="NAME", help="lm-evaluation-harness tasks")
    p.add_argument("--include-path", default=None, help="a folder of lm-eval task YAML files of your own")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval few-shot examples (default: the task's)")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: at most this many documents per task")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--trials", type=int, default=3, help="seeded keys per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=None, type=storage.out_dir, help="folder for perplexity.json, passkey.json/.md/.png"
    )
    p.set_defaults(func=run_eval)
    p = sub.add_parser("passkey-corpus", help="synthetic passkey texts (with answers) to train on")
    p.add_argument("out", help="the JSONL file to write")
    p.add_argument("--tokenizer", default="mistral-v1")
    p.add_argument("--docs", type=int, default=40000)
    p.add_argument("--max-tokens", type=int, default=256, help="longest text, in tokens")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_passkey_corpus)
