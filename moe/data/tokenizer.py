"""Tokenizers: Mistral's v1 sentencepiece model (shipped in mistral-common) or your own."""

from __future__ import annotations

import functools
from pathlib import Path

import mistral_common
import sentencepiece as spm

from moe import config as config_lib

MISTRAL_V1 = "mistral-v1"


def mistral_v1_path() -> Path:
    """Mistral 7B / Mixtral 8x7B's sentencepiece model (vocab 32000, bos 1, eos 2)."""
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"mistral-common is installed but has no {path}; reinstall mistral-common")
    return path


def resolve(spec: str) -> Path:
    """The .model file for a tokenizer spec: 'mistral-v1' or a path (relative paths: from the
    current directory, else from the package's shipped files, which configs point at)."""
    if spec == MISTRAL_V1:
        return mistral_v1_path()
    path = Path(spec)
    shipped = config_lib.shipped(path)  # a tokenizer shipped with the package (configs point at them)
    if not path.is_file() and not path.is_absolute() and shipped.is_file():
        return shipped
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer model {spec!r} not found; give 'mistral-v1' or the path of a "
            "sentencepiece .model (make one with `moe tokenizer train`)"
        )
    return path


@functools.lru_cache(maxsize=8)
def load(spec: str) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(resolve(spec)))


def check_vocab(spec: str, vocab_size: int) -> None:
    """Refuse a tokenizer whose vocabulary differs from the model's embedding."""
    sp = load(spec)
    if sp.vocab_size() != vocab_size:
        raise ValueError(
            f"tokenizer {spec!r} has a vocabulary of {sp.vocab_size()} but model.vocab_size is "
            f"{vocab_size}; set model.vocab_size={sp.vocab_size()} or use a matching tokenizer"
        )


def train(inputs: list[Path], out_prefix: str | Path, vocab_size: int, max_sentence_length: int = 16384) -> Path:
    """Train a BPE sentencepiece model (bos 1, eos 2, unk 0, like Mistral's) on text files."""
    if not inputs:
        raise ValueError("no training text for the tokenizer; pass files, directories or globs")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=[str(p) for p in inputs],
        model_prefix=str(out_prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        max_sentence_length=max_sentence_length,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        train_extremely_large_corpus=False,
        minloglevel=2,
    )
    return Path(f"{out_prefix}.model")
