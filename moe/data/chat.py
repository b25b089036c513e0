"""Chat and preference data: JSONL rows -> Mistral instruct tokens with a loss mask.

data.format=chat, one conversation per line, either
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}
data.format=preference, one comparison per line, the prompt as "prompt" or "messages"
(ending with a user turn) and two answers:
    {"prompt": "...", "chosen": "...", "rejected": "..."}

Rendering is mistral-common's (its v1 instruct template, [INST] ... [/INST], built on the
run's own sentencepiece model), so the tokens are exactly what mistral-common produces for
the conversation. Only assistant tokens carry loss (each answer's tokens and its eos); the
mask comes from the token counts of the conversation's prefixes, each also rendered by
mistral-common. A conversation longer than train.seq_len + 1 tokens loses its oldest
exchanges (data.overflow=truncate; the system message stays) or is dropped (drop).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from moe.data import tokenizer as tokenizer_lib

ROLES = ("system", "user", "assistant")


class ChatDataError(ValueError):
    """A malformed chat or preference row; the message names the file and line."""


# ----------------------------------------------------------------------------- parsing


def _messages(row: dict, where: str, need_answer: bool) -> list[dict]:
    if "messages" in row:
        messages = row["messages"]
    elif "prompt" in row:
        messages = [{"role": "user", "content": row["prompt"]}]
        if need_answer:
            if "completion" not in row:
                raise ChatDataError(f"{where}: a prompt row needs a 'completion' (the assistant's answer)")
            messages.append({"role": "assistant", "content": row["completion"]})
    else:
        raise ChatDataError(f"{where}: a row needs 'messages' (a list of turns) or 'prompt'")
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatDataError(
                f'{where}: turn {i} must be {{"role": one of {list(ROLES)}, "content": text}}, got {json.dumps(m)[:80]}'
            )
    return messages


def _check_order(messages: list[dict], where: str, ends_with: str) -> None:
    """An optional system turn, then user and assistant alternating from a user turn."""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ChatDataError(
                f"{where}: roles out of order at turn {i + len(messages) - len(turns)}: expected "
                f"{want}, got {m['role']} (an optional system turn first, then user and assistant "
                "alternating)"
            )
        if m["role"] == "assistant" and not m["content"].strip():
            raise ChatDataError(
                f"{where}: empty assistant turn at turn {i + len(messages) - len(turns)}; "
                "remove the row or give the answer"
            )
    if not turns or turns[-1]["role"] != ends_with:
        raise ChatDataError(
            f"{where}: the conversation must end with a{'n' if ends_with[0] == 'a' else ''} {ends_with} turn"
        )


def parse(row, where: str, fmt: str) -> dict:
    """A checked row: {"messages"} (chat) or {"messages", "chosen", "rejected"} (preference)."""
    if not isinstance(row, dict):
        raise ChatDataError(f"{where}: each line must be a JSON object")
    if fmt == "chat":
        messages = _messages(row, where, need_answer=True)
        _check_order(messages, where, "assistant")
        return {"messages": messages}
    messages = _messages(row, where, need_answer=False)
    _check_order(messages, where, "user")
    for key in ("chosen", "rejected"):
        value = row.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if not isinstance(value, str) or not value.strip():
            raise ChatDataError(f"{where}: a preference row needs a non-empty '{key}' answer")
        row = {**row, key: value}
    return {"messages": messages, "chosen": row["chosen"], "rejected": row["rejected"]}


def read_row(path: str, offset: int, line: int, fmt: str) -> dict:
    where = f"{path}:{line}"
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.readline()
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    return parse(row, where, fmt)


# ----------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=4)
def _mistral(tokenizer_path: str, finetuning: bool):
    mode = ValidationMode.finetuning if finetuning else ValidationMode.test
    return MistralTokenizer.from_file(tokenizer_path, mode=mode)


def _encode(tokenizer_path: str, messages: list[dict]) -> list[int]:
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    finetuning = messages[-1]["role"] == "assistant"
    return list(_mistral(tokenizer_path, finetuning).encode_chat_completion(request).tokens)


def encode_prompt(tokenizer_path: str, messages: list[dict]) -> list[int]:
    """The tokens of a conversation ending with a user turn, up to [/INST]: a prompt."""
    return _encode(tokenizer_path, messages)


def render(tokenizer_path: str, messages: list[dict], last_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [n], mask [n]: 1 on every assistant token, its eos included; with
    last_only, on the last assistant turn's only)."""
    ids = _encode(tokenizer_path, messages)
    mask = np.zeros(len(ids), np.int32)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in answers[-1:] if last_only else answers:
        upto = ids if i + 1 == len(messages) else _encode(tokenizer_path, messages[: i + 1])
        start = len(_encode(tokenizer_path, messages[:i]))
        if upto != ids[: len(upto)]:
            raise ChatDataError(
                "mistral-common's rendering of this conversation is not prefix-stable; "
                "cannot tell the assistant's tokens apart"
            )
        mask[start : len(upto)] = 1
    return np.asarray(ids, np.int32), mask


def fit(tokenizer_path: str, messages: list[dict], max_tokens: int, overflow: str, last_only: bool = False):
    """(ids, mask, dropped_turns) within max_tokens, or None when it cannot fit (or drop)."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    dropped = 0
    while True:
        ids, mask = render(tokenizer_path, system + turns, last_only)
        if len(ids) <= max_tokens:
            return ids, mask, dropped
        if overflow == "drop" or len(turns) <= 2:
            return None
        turns, dropped = turns[2:], dropped + 2  # the oldest user/assistant exchange


def example(ids: np.ndarray, mask: np.ndarray) -> dict:
    """Next-token training arrays: inputs ids[:-1], targets ids[1:], loss_mask on targets."""
    return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}


def tokenizer_path(spec: str) -> str:
    return str(Path(tokenizer_lib.resolve(spec)))
