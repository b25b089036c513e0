"""The HTTP API: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health
and Prometheus /metrics, over one Engine (moe/serve/engine.py) stepping in its own thread.

Each HTTP request becomes one engine request per choice; the engine thread hands every new
token to the request's asyncio queue. Text is the tokenizer's decoding of the tokens so
far; a stop string ends the choice and is cut from its text; a stream holds back text that
ends in a partial UTF-8 character. A client that goes away cancels its requests, which
frees their rows at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from moe.data import chat
from moe.serve import openai as api
from moe.serve.engine import ContextLengthError, Engine, EngineError
from moe.serve.engine import Request as EngineRequest
from moe.serve.metrics import Metrics


class Choice:
    """One engine request and the text it has produced, stop strings applied.

    The text grows by decoding only the tokens since the last complete piece of text, with
    the token before them for context (sentencepiece drops a leading space at the start of
    what it decodes): each new token costs a decode of a few tokens, not of the whole answer.
    """

    def __init__(self, sp, prompt: list[int], stops: list[str]):
        self.sp, self.prompt, self.stops = sp, prompt, stops
        self.text, self.sent, self.scores, self.pieces = "", 0, [], []
        self.raw, self.context, self.read = "", 0, 0  # text before stops; tokens[context:read] decode to raw's tail
        self.events: asyncio.Queue = asyncio.Queue()
        self.request: EngineRequest | None = None

    def _new_text(self, tokens: list[int], final: bool) -> str:
        """The text tokens[read:] add to the answer; "" while they end inside a character."""
        known = self.sp.decode(tokens[self.context : self.read])
        now = self.sp.decode(tokens[self.context :])
        if len(now) <= len(known) or (now.endswith("\ufffd") and not final):
            return ""
        self.context, self.read = self.read, len(tokens)
        return now[len(known) :]

    def _extend(self, tokens: list[int], final: bool) -> tuple[str, bool]:
        """Add the new text, cut at the first stop string: (the text added, whether a stop
        string has appeared)."""
        before = self.text
        self.raw += self._new_text(tokens, final)
        cut = min(
            (i for i in (self.raw.find(s, max(len(before) - len(s), 0)) for s in self.stops) if i >= 0), default=-1
        )
        self.text = self.raw if cut < 0 else self.raw[:cut]
        return self.text[len(before) :], cut >= 0

    def on_token(self, loop, request, token, logprob, top_ids, top_logprobs) -> bool:
        """Engine thread: record the token; True when a stop string has appeared."""
        piece, stopped = self._extend(request.tokens, final=False)
        self.pieces.append(piece)
        self.scores.append((logprob, top_ids, top_logprobs))
        loop.call_soon_threadsafe(self.events.put_nowait, "token")
        return stopped

    def on_done(self, loop, request) -> None:
        if self.pieces and self.read < len(request.tokens) and self.text == self.raw:
            self.pieces[-1] += self._extend(request.tokens, final=True)[0]  # the answer ends inside a character
        loop.call_soon_threadsafe(self.events.put_nowait, "done")

    def fresh_text(self, final: bool) -> str:
        """Text not streamed yet. Until the end, a trailing partial character and a tail that
        could begin a stop string wait for the next token."""
        end = len(self.text)
        if not final:
            end = len(self.text.rstrip("\ufffd"))
            held = max((n for s in self.stops for n in range(1, len(s)) if self.text[:end].endswith(s[:n])), default=0)
            end -= held
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out


class Server:
    """What the routes share: the engine, the tokenizer, the model's id, the metrics."""

    def __init__(self, engine: Engine, sp, tokenizer: str, model_id: str, api_key: str | None):
        self.engine, self.sp, self.tokenizer, self.model_id, self.api_key = engine, sp, tokenizer, model_id, api_key
        self.metrics = Metrics(engine)

    async def authorize_and_count(self, request: Request, call_next):
        counted = request.url.path.startswith("/v1/")
        if self.api_key and counted and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            error = api.APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")
            self.metrics.requests.labels(request.url.path, "401").inc()
            return JSONResponse(error.body(), status_code=401)
        response = await call_next(request)
        if counted:
            self.metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    def model_ids(self) -> list[str]:
        """The base's id, then every adapter's name (a request's `model` picks one)."""
        return [self.model_id, *self.engine.adapters]

    def adapter_of(self, name: str) -> str | None:
        """The adapter a request's model names (None: the base); 404 for any other name."""
        if name not in self.model_ids():
            message = f"model {name!r} does not exist; this server serves {self.model_ids()}"
            raise api.APIError(404, message, code="model_not_found")
        return None if name == self.model_id else name

    def start(
        self, prompt: list[int], body: api.Sampling, max_tokens: int, index: int, scores: bool, top: bool
    ) -> Choice:
        """Submit one choice's request; the engine thread reports to its asyncio queue."""
        choice, loop = Choice(self.sp, prompt, body.stops()), asyncio.get_running_loop()
        seed = (body.seed if body.seed is not None else time.monotonic_ns() % 2**31) + index
        adapter = self.adapter_of(body.model)
        request = EngineRequest(prompt, max_tokens, body.temperature, body.top_k, body.top_p, seed, adapter)
        request.prompt_logprobs = scores
        request.top_logprobs = top
        request.on_token = lambda *a: choice.on_token(loop, *a)
        request.on_done = lambda r: choice.on_done(loop, r)
        try:
            choice.request = self.engine.submit(request)
        except ContextLengthError as e:
            raise api.APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        except EngineError as e:
            raise api.APIError(400, str(e), param="prompt") from None
        return choice

    async def finished(self, choices: list[Choice], http: Request) -> None:
        """Wait for every choice; a client that goes away cancels them."""
        for choice in choices:
            while not choice.request.done.is_set() or not choice.events.empty():
                try:
                    await asyncio.wait_for(choice.events.get(), timeout=0.5)
                except TimeoutError:
                    if await http.is_disconnected():
                        for c in choices:
                            c.request.cancel()
                        return
        for choice in choices:
            self.metrics.record(choice.request)
            _raise_engine_error(choice, self.engine)

    def stream(self, choices: list[Choice], chunk) -> StreamingResponse:
        """Server-sent events: each choice's new text as it comes, its finish, then [DONE]."""

        async def events():
            try:
                for i, choice in enumerate(choices):
                    while True:
                        event = await choice.events.get()
                        text = choice.fresh_text(final=event == "done")
                        if text:
                            yield f"data: {json.dumps(chunk(i, text, None))}\n\n"
                        if event == "done":
                            yield f"data: {json.dumps(chunk(i, '', _reason(choice)))}\n\n"
                            self.metrics.record(choice.request)
                            break
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or the stream ended): free the rows
                for choice in choices:
                    choice.request.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def completions(self, body: api.CompletionRequest, http: Request):
        self.adapter_of(body.model)
        prompts = _prompts(body.prompt, self.sp)
        if body.max_tokens == 0 and not body.echo:
            raise api.APIError(400, "max_tokens 0 returns nothing without echo", param="max_tokens")
        scores = body.echo and body.logprobs is not None
        every = [p for p in prompts for _ in range(body.n)]
        top = bool(body.logprobs)
        choices = [self.start(p, body, body.max_tokens, i, scores, top) for i, p in enumerate(every)]
        request_id = api.new_id("cmpl")
        if body.stream:
            return self.stream(choices, lambda i, text, end: _completion_chunk(request_id, body.model, i, text, end))
        await self.finished(choices, http)
        out = [_completion_choice(c, i, body, self.sp) for i, c in enumerate(choices)]
        return api.envelope("text_completion", request_id, body.model, out, _usage(choices))

    async def chat_completions(self, body: api.ChatRequest, http: Request):
        self.adapter_of(body.model)
        if body.messages[-1].role != "user":
            raise api.APIError(400, "the last message must be the user's", param="messages")
        try:
            messages = [m.model_dump() for m in body.messages]
            prompt = chat.encode_prompt(chat.tokenizer_path(self.tokenizer), messages)
        except Exception as e:  # mistral-common's validation: roles out of order, empty content
            raise api.APIError(400, f"messages: {e}", param="messages") from None
        limit = body.limit() or max(self.engine.max_seq_len - len(prompt), 1)
        top = bool(body.logprobs and body.top_logprobs)
        choices = [self.start(prompt, body, limit, i, False, top) for i in range(body.n)]
        request_id = api.new_id("chatcmpl")
        if body.stream:
            return self.stream(choices, lambda i, text, end: _chat_chunk(request_id, body.model, i, text, end))
        await self.finished(choices, http)
        top, text_of = body.top_logprobs or 0, _token_text(self.sp)
        out = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": api.chat_logprobs(c.pieces, c.scores, top, text_of) if body.logprobs else None,
                "finish_reason": _reason(c),
            }
            for i, c in enumerate(choices)
        ]
        return api.envelope("chat.completion", request_id, body.model, out, _usage(choices))


def create_app(engine: Engine, sp, tokenizer: str, model_id: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving `engine` as model `model_id`; tokenizer: the spec chat
    prompts are rendered with (Mistral's instruct template through mistral-common)."""
    server = Server(engine, sp, tokenizer, model_id, api_key)
    app = FastAPI(title="moe serve")
    app.exception_handler(api.APIError)(_api_error)
    app.exception_handler(RequestValidationError)(_bad_request)
    app.middleware("http")(server.authorize_and_count)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat_completions)

    @app.get("/health")
    async def health():
        return {"status": "ok", "rows_in_use": engine.rows_in_use(), "waiting": engine.waiting.qsize()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        entry = lambda name: {"id": name, "object": "model", "created": 0, "owned_by": "moe", "root": model_id}  # noqa: E731
        return {"object": "list", "data": [entry(name) for name in server.model_ids()]}

    return app


async def _api_error(_, e: api.APIError):
    return JSONResponse(e.body(), status_code=e.status)


async def _bad_request(_, e: RequestValidationError):
    first = e.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return JSONResponse(api.APIError(400, f"{param}: {first.get('msg')}", param=param).body(), status_code=400)


def _prompts(prompt, sp) -> list[list[int]]:
    if isinstance(prompt, str):
        return [[sp.bos_id(), *sp.encode(prompt)]]
    if not prompt:
        raise api.APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [[sp.bos_id(), *sp.encode(p)] if isinstance(p, str) else list(p) for p in prompt]


def _raise_engine_error(choice: Choice, engine: Engine) -> None:
    if choice.request.finish_reason == "error":
        raise api.APIError(500, f"the model failed: {engine.error}", kind="server_error")


def _token_text(sp):
    return lambda i: sp.id_to_piece(i).replace("\u2581", " ")


def _reason(choice: Choice) -> str:
    reason = choice.request.finish_reason
    return "length" if reason == "length" else "stop"


def _usage(choices: list[Choice]) -> dict:
    return api.usage(sum(len(c.prompt) for c in choices), sum(len(c.request.tokens) for c in choices))


def _completion_choice(c: Choice, index: int, body: api.CompletionRequest, sp) -> dict:
    text, pieces, scores = c.text, c.pieces, c.scores
    if body.echo:
        prompt_text = sp.decode(c.prompt)
        echoed = [sp.decode(c.prompt[: i + 1])[len(sp.decode(c.prompt[:i])) :] for i in range(len(c.prompt))]
        text, pieces = prompt_text + text, echoed + pieces
        scores = [(None, [], []), *c.request.prompt_scores, *scores]
    logprobs = None
    if body.logprobs is not None:
        logprobs = api.completion_logprobs(pieces, scores, body.logprobs, _token_text(sp))
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": _reason(c)}


def _completion_chunk(request_id, model_id, index, text, finish_reason) -> dict:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return api.envelope("text_completion", request_id, model_id, [choice])


def _chat_chunk(request_id, model_id, index, text, finish_reason) -> dict:
    delta = {"role": "assistant", "content": text} if text else {}
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return api.envelope("chat.completion.chunk", request_id, model_id, [choice])
