"""OpenAI's request and response shapes for completions and chat completions.

Requests are pydantic models (a field out of range is a 400 with OpenAI's error JSON, see
app.py); responses are plain dicts built here. top_k is an extension (0: off), as vLLM's.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moe.serve.engine import TOP_LOGPROBS


class APIError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields this server does not use are accepted and ignored

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    stream: bool = False

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes at most 4 non-empty strings", param="stop")
        return stops


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    echo: bool = False


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def envelope(kind: str, request_id: str, model: str, choices: list[dict], use: dict | None = None) -> dict:
    body = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


def completion_logprobs(pieces: list[str], scores: list, top_n: int, decode) -> dict:
    """The legacy completions logprobs object: tokens, token_logprobs, top_logprobs and
    text_offset; scores[i] is (logprob or None, top ids, top logprobs)."""
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    tops = [
        None if lp is None else {decode(int(i)): float(v) for i, v in zip(ids[:top_n], vals[:top_n])}
        for lp, ids, vals in scores
    ]
    return {
        "tokens": pieces,
        "token_logprobs": [None if lp is None else float(lp) for lp, _, _ in scores],
        "top_logprobs": tops if top_n else None,
        "text_offset": offsets,
    }


def chat_logprobs(pieces: list[str], scores: list, top_n: int, decode) -> dict:
    """The chat logprobs object: per generated token its text, logprob, bytes and top alternatives."""
    content = []
    for piece, (lp, ids, vals) in zip(pieces, scores):
        top = [
            {"token": decode(int(i)), "logprob": float(v), "bytes": list(decode(int(i)).encode())}
            for i, v in zip(ids[:top_n], vals[:top_n])
        ]
        content.append({"token": piece, "logprob": float(lp), "bytes": list(piece.encode()), "top_logprobs": top})
    return {"content": content}
