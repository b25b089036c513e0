"""The tokenizer files of an exported Hugging Face folder.

A folder with Mistral's sentencepiece model alone (tokenizer.model) loads in transformers'
AutoTokenizer without a beginning-of-sequence token, so its text diverges from ours after a
few tokens. Beside tokenizer.model this writes what transformers reads: tokenizer_config.json
and special_tokens_map.json with the model's own bos / eos / unk pieces and Mistral's
behaviour (bos added, eos not), and, where transformers is installed, tokenizer.json (the
fast tokenizer it builds from the sentencepiece model).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from moe.config import ModelConfig
from moe.data import tokenizer as tokenizer_lib


def default_tokenizer(spec: str | Path, cfg: ModelConfig) -> str | Path | None:
    """The tokenizer an export carries when none is given: `spec` (the run's or the converted
    folder's) if it is there and fits the model's vocabulary, else none, with a warning."""
    try:
        tokenizer_model(spec, cfg)
    except (OSError, RuntimeError, ValueError) as e:
        warnings.warn(f"the export carries no tokenizer: {e}", stacklevel=2)
        return None
    return spec


def tokenizer_model(spec: str | Path, cfg: ModelConfig) -> Path:
    """The sentencepiece model of `spec` (a .model path or "mistral-v1"), refused unless its
    vocabulary is the model's (checked before an export writes anything)."""
    model_file = tokenizer_lib.resolve(str(spec))
    vocab = tokenizer_lib.load(str(model_file)).vocab_size()
    if vocab != cfg.vocab_size:
        raise ValueError(
            f"tokenizer {spec} has a vocabulary of {vocab} but the model's is {cfg.vocab_size}; "
            "pass --tokenizer with the model's own tokenizer"
        )
    return model_file


def write_tokenizer(out: Path, model_file: Path, cfg: ModelConfig) -> None:
    """tokenizer.model (a copy of `model_file`) and the files transformers reads, into `out`."""
    sp = tokenizer_lib.load(str(model_file))
    shutil.copy(model_file, out / "tokenizer.model")
    special = {"bos_token": sp.id_to_piece(cfg.bos_id), "eos_token": sp.id_to_piece(cfg.eos_id)}
    if sp.unk_id() >= 0:
        special["unk_token"] = sp.id_to_piece(sp.unk_id())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        **special,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_seq_len,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    try:  # optional: transformers builds the fast tokenizer's tokenizer.json from the two above
        from transformers import AutoTokenizer
    except ImportError:
        return
    AutoTokenizer.from_pretrained(out).backend_tokenizer.save(str(out / "tokenizer.json"))
