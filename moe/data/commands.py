"""`moe tokenizer train`: a BPE sentencepiece model on a corpus."""

from __future__ import annotations


def run_tokenizer(args) -> int:
    from moe.config import DataConfig
    from moe.data import pipeline, tokenizer

    files = pipeline.resolve_paths(tuple(args.inputs)) if args.inputs else pipeline.corpus_files(DataConfig())
    path = tokenizer.train(files, args.out, args.vocab_size)
    sp = tokenizer.load(str(path))
    print(
        f"trained {path} (vocab {sp.vocab_size()}) on {len(files)} files; "
        f"use it with data.tokenizer={path} model.vocab_size={sp.vocab_size()}"
    )
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("tokenizer", help="sentencepiece tokenizers")
    actions = p.add_subparsers(dest="action", required=True)
    t = actions.add_parser("train", help="train a BPE sentencepiece model on a corpus")
    t.add_argument("inputs", nargs="*", help="files, directories or globs (default: the stdlib corpus)")
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab")
    t.set_defaults(func=run_tokenizer)
