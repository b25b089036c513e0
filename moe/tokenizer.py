"""Tokenizers: Mistral's v1 sentencepiece model (shipped in mistral-common) or your own."""

from __future__ import annotations

from pathlib import Path


def mistral_v1_path() -> Path:
    """Mistral 7B / Mixtral 8x7B's sentencepiece model (vocab 32000, bos 1, eos 2)."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"mistral-common is installed but has no {path}; reinstall mistral-common")
    return path
