"""Continuous batching: a fixed set of decode rows, each with its own positions and cache.

    engine = Engine(cfg, params, rows=8, max_seq_len=4096)
    engine.start()                                   # the model runs in one background thread
    request = engine.submit(prompt_ids, max_tokens=64, on_token=callback)

A few compiled programs serve every request, whatever its length (`warm_up` compiles them):
  prefill_chunk  one row's next PREFILL_CHUNK prompt tokens into its slice of the cache,
                 with the log-probability of every prompt token (for echo and scoring)
  decode_step    one new token for each of the first 1, 2, 4, ... rows (the fewest that
                 hold the busy ones; requests take the lowest free rows); rows that are
                 free or still prefilling take position -1, which the cache neither
                 writes nor attends
Between decode steps the engine admits waiting requests into free rows (their cache rows
emptied) and runs one prefill chunk, so a long prompt enters a chunk at a time while the
other rows keep decoding. A row's tokens depend only on its own prompt, sampling settings
and seed: greedy output equals `moe.infer.generate` on that prompt alone. Sampling settings
are per row (temperature 0 is greedy; top-k 0 and top-p 1 are off), drawn with the key
(seed, 0) folded with the step, as `generate` draws a lone prompt's.

Each request names its adapter or the base (moe/serve/adapters.py): a step with an adapter
row runs the bank's params, with each row's selector; a step without one runs the base
alone. Serving adapters doubles the programs, still none per request.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moe.config import ModelConfig
from moe.model import kv_cache
from moe.model.transformer import LMHead, Transformer
from moe.serve.adapters import Adapter, bank

PREFILL_CHUNK = 64  # prompt tokens per prefill step: what a long prompt delays the other rows by
TOP_LOGPROBS = 20  # alternatives computed per position (OpenAI's most)


class EngineError(ValueError):
    """A request the engine cannot run; the message says what and how to fix it."""


class ContextLengthError(EngineError):
    """The prompt and max_tokens do not fit the context of a model without a window."""


@dataclasses.dataclass
class Request:
    """One generation; the engine thread fills tokens and calls on_token / on_done."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    adapter: str | None = None  # a served adapter's name; None: the base
    on_token: Callable | None = None  # (request, token, logprob, top ids, top logprobs)
    on_done: Callable | None = None  # (request)
    prompt_logprobs: bool = False
    top_logprobs: bool = False  # alternatives per generated token (costs a top-k over the vocabulary)
    # filled by the engine
    tokens: list[int] = dataclasses.field(default_factory=list)
    prompt_scores: list = dataclasses.field(default_factory=list)  # (logprob, top ids, top logprobs) per token
    finish_reason: str | None = None
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Free its row at the next step (a client that went away)."""
        self.cancelled = True


def _row(tree, r):
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, r, 1, axis=1 if a.ndim == 5 else 0), tree)


def _put_row(tree, part, r):
    return jax.tree_util.tree_map(
        lambda a, p: jax.lax.dynamic_update_slice_in_dim(a, p, r, axis=1 if a.ndim == 5 else 0), tree, part
    )


def _scores(logits_nv, next_n, want_top=True):
    """(log p(next) [n], top ids [n, K], top log p [n, K]) from float32 logits [n, vocab]; the
    alternatives (a top-k over the vocabulary, the costly part) only when want_top, else 0."""
    logp = jax.nn.log_softmax(logits_nv.astype(jnp.float32), axis=-1)
    n = logp.shape[0]
    none = (jnp.zeros((n, TOP_LOGPROBS), jnp.float32), jnp.zeros((n, TOP_LOGPROBS), jnp.int32))
    top_lp, top_ids = jax.lax.cond(want_top, lambda x: tuple(jax.lax.top_k(x, TOP_LOGPROBS)), lambda x: none, logp)
    return jnp.take_along_axis(logp, next_n[:, None], axis=-1)[:, 0], top_ids, top_lp


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=4)
def _prefill_chunk(
    cfg: ModelConfig, lora, scores: bool, params, cache, select, row, tokens_c, next_c, start, n_valid, empty_first
):
    """Run prompt tokens [start, start + n_valid) of row `row` (tokens_c: [C], padded) into
    the cache; returns (cache, last logits [vocab], scores of next_c, the prompt's tokens one
    further on, with their alternatives; None unless `scores`). empty_first: the row's cache
    is emptied first (a new request). lora, select [1, rank]: the adapter bank's view and the
    row's columns (None: the base). Without scores the LM head runs on the last token only
    (on tiny-moe the head over a whole chunk costs more than its layers)."""
    part = _row(cache, row)
    part = {**part, "pos": jnp.where(empty_first, -1, part["pos"]), "end": jnp.where(empty_first, 0, part["end"])}
    index = jnp.arange(tokens_c.shape[0])
    positions = jnp.where(index < n_valid, start + index, -1)[None]
    model = Transformer(cfg, lora=lora, head=scores)
    out, _, part = model.apply({"params": params}, tokens_c[None], positions, cache=part, adapter_select=select)
    last = out[0, jnp.maximum(n_valid - 1, 0)]  # logits [vocab], or hidden [d_model] without scores
    if not scores:
        return _put_row(cache, part, row), LMHead(cfg).apply({"params": params["lm_head"]}, last), None
    return _put_row(cache, part, row), last, _scores(out[0], next_c)


def _filtered(scaled_bv, top_k_b, top_p_b):
    """Top-k, then top-p (as generate applies them), with one sort per row."""
    vocab = scaled_bv.shape[-1]
    ordered = -jnp.sort(-scaled_bv, axis=-1)  # [batch, vocab], descending
    k = jnp.where(top_k_b > 0, jnp.minimum(top_k_b, vocab), vocab)
    ordered = jnp.where(jnp.arange(vocab) < k[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_kept = jnp.maximum(jnp.sum(mass_before < top_p_b[:, None], axis=-1), 1)  # the top token always stays
    threshold = jnp.take_along_axis(ordered, (jnp.minimum(n_kept, k) - 1)[:, None], axis=-1)
    return jnp.where(scaled_bv >= threshold, scaled_bv, -jnp.inf)


def _sample_rows(logits_bv, temperature_b, top_k_b, top_p_b, keys_b):
    """Next tokens [batch] with per-row settings (temperature 0: greedy). The sort that top-k
    and top-p need runs only when some sampled row asks for one of them."""
    greedy = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    sampled = temperature_b > 0
    scaled = logits_bv / jnp.where(sampled, temperature_b, 1.0)[:, None]
    needs_filter = jnp.any(sampled & ((top_k_b > 0) | (top_p_b < 1)))
    scaled = jax.lax.cond(needs_filter, _filtered, lambda x, *_: x, scaled, top_k_b, top_p_b)
    # the Gumbel noise of a draw costs as much as the model on CPU: only when a row samples
    draw = lambda: jax.vmap(jax.random.categorical)(keys_b, scaled).astype(jnp.int32)  # noqa: E731
    drawn = jax.lax.cond(jnp.any(sampled), draw, lambda: greedy)
    return jnp.where(sampled, drawn, greedy)


def _keys(seeds_b, steps_b):
    """Row keys as `generate` draws a lone prompt's: key(seed) folded with 0, then the step."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), 0), t))(seeds_b, steps_b)


@jax.jit
def _first_token(last_v, temperature, top_k, top_p, seed):
    """The first new token [1] and its scores, from the prompt's last logits [vocab]."""
    logits = last_v[None]
    nxt = _sample_rows(logits, temperature[None], top_k[None], top_p[None], _keys(seed[None], jnp.zeros(1, jnp.uint32)))
    return nxt, _scores(logits, nxt)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=4)
def _decode_step(cfg: ModelConfig, lora, n_rows: int, params, cache, select, tokens_b, active_b, sampling_b, want_top):
    """One token for every active row among the first n_rows: (cache, next [n_rows], scores
    of next). The rows past n_rows are neither read nor computed (their cache stays as it
    is). sampling_b: (temperature, top_k, top_p, seed, step) per row; want_top: some row
    wants alternatives; select [n_rows, rank]: each row's adapter columns (None, with lora
    None: the base alone)."""
    temperature_b, top_k_b, top_p_b, seeds_b, steps_b = sampling_b
    part = jax.tree_util.tree_map(lambda a: jax.lax.slice_in_dim(a, 0, n_rows, axis=1 if a.ndim == 5 else 0), cache)
    positions = jnp.where(active_b, part["end"], -1)[:, None]
    model = Transformer(cfg, lora=lora)
    logits, _, part = model.apply({"params": params}, tokens_b[:, None], positions, cache=part, adapter_select=select)
    logits = logits[:, 0]
    nxt = _sample_rows(logits, temperature_b, top_k_b, top_p_b, _keys(seeds_b, steps_b))
    return _put_row(cache, part, 0), nxt, _scores(logits, nxt, want_top)


def row_buckets(rows: int) -> list[int]:
    """The row counts decode steps are compiled for: 1, 2, 4, 8, ... and `rows`. A step
    computes the smallest that holds every busy row (requests take the lowest free rows), so
    a lone request does not pay for the whole batch, nor 8 requests for 32 rows."""
    return sorted({min(2**i, rows) for i in range(rows.bit_length())} | {rows})


class Engine:
    """The decode rows, their cache and the waiting requests; `step()` advances them once,
    `start()` steps in a background thread until `stop()`."""

    def __init__(
        self, cfg: ModelConfig, params, rows: int = 8, max_seq_len: int | None = None, adapters: list[Adapter] = ()
    ):
        if rows < 1:
            raise EngineError(f"--max-batch must be >= 1, got {rows}")
        self.cfg, self.params, self.rows = cfg, params, rows
        self.bank = bank(params, list(adapters), cfg.param_dtype) if adapters else None
        self.buckets = row_buckets(rows)
        self.adapters = [a.name for a in adapters]
        self.max_seq_len = max_seq_len or cfg.max_seq_len
        if cfg.sliding_window is None and self.max_seq_len > cfg.max_seq_len:
            raise EngineError(
                f"--max-seq-len {self.max_seq_len} exceeds model.max_seq_len ({cfg.max_seq_len}) of a model "
                "without a sliding window"
            )
        self.cache = kv_cache.init(cfg, rows, kv_cache.slots_needed(cfg, self.max_seq_len))
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.occupant: list[Request | None] = [None] * rows
        self.filled = [0] * rows  # prompt tokens in the cache
        self.fresh = [False] * rows  # the row's cache still holds its previous occupant
        self.last = [0] * rows  # the row's newest token
        self.error: str | None = None
        self.generated = 0  # tokens produced since start, every request's
        self._stop, self._wake, self._thread = threading.Event(), threading.Event(), None

    # ---- requests
    def check(self, prompt: list[int], max_tokens: int, adapter: str | None = None) -> None:
        if not prompt:
            raise EngineError("the prompt is empty; give at least one token")
        if min(prompt) < 0 or max(prompt) >= self.cfg.vocab_size:
            raise EngineError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
        if max_tokens < 0:
            raise EngineError(f"max_tokens must be >= 0, got {max_tokens}")
        if adapter is not None and adapter not in self.adapters:
            raise EngineError(f"no adapter named {adapter!r}; this server has {self.adapters or 'none'}")
        if self.cfg.sliding_window is None and len(prompt) + max_tokens > self.max_seq_len:
            raise ContextLengthError(
                f"the prompt's {len(prompt)} tokens plus max_tokens {max_tokens} exceed this model's context of "
                f"{self.max_seq_len} tokens; shorten the prompt or ask for at most "
                f"{max(self.max_seq_len - len(prompt), 0)} tokens"
            )

    def submit(self, request: Request) -> Request:
        self.check(request.prompt, request.max_tokens, request.adapter)
        self.waiting.put(request)
        self._wake.set()
        return request

    def rows_in_use(self) -> int:
        return sum(r is not None for r in self.occupant)

    def compiles(self) -> int:
        """Programs compiled so far for the engine's functions (constant after warm-up)."""
        return _prefill_chunk._cache_size() + _decode_step._cache_size() + _first_token._cache_size()

    def warm_up(self) -> None:
        """Compile every program the engine can run (each decode row count, with and without
        the adapters) with no row busy, which changes nothing in the cache: no request then
        waits for a compile."""
        variants = [[None]] + ([[self.adapters[0]]] if self.adapters else [])
        for names in variants:
            lora, params, select = self._weights(names * self.rows)
            for n in self.buckets:
                sampling = (np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32))
                sampling += (np.zeros(n, np.uint32), np.zeros(n, np.uint32))
                self.cache, *_ = _decode_step(
                    self.cfg,
                    lora,
                    n,
                    params,
                    self.cache,
                    None if select is None else select[:n],
                    np.zeros(n, np.int32),
                    np.zeros(n, bool),
                    sampling,
                    False,
                )
            pad = np.zeros(PREFILL_CHUNK, np.int32)
            for scores in (False, True):
                row_select = None if select is None else select[:1]
                self.cache, last, _ = _prefill_chunk(
                    self.cfg, lora, scores, params, self.cache, row_select, 0, pad, pad, 0, 0, False
                )
        _first_token(last, *(np.asarray(v) for v in (0.0, 0, 1.0, 0)))  # as _prefill_one passes a request's

    # ---- the loop
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="moe-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.step()
            except Exception as e:  # a failed step ends its requests with the error; the engine goes on
                self.error = f"{type(e).__name__}: {e}"
                for r, request in enumerate(self.occupant):
                    if request is not None:
                        self._finish(r, "error")
                busy = True
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()

    def step(self) -> bool:
        """Admit, one prefill chunk, one decode step; False when there was nothing to do."""
        for r, request in enumerate(self.occupant):
            if request is not None and request.cancelled:
                self._finish(r, "cancelled")
        self._admit()
        prefilled = self._prefill_one()
        decoded = self._decode()
        return prefilled or decoded

    def _admit(self) -> None:
        for r in range(self.rows):
            if self.occupant[r] is None and not self.waiting.empty():
                request = self.waiting.get()
                if request.cancelled:
                    request.finish_reason, request.finished_at = "cancelled", time.monotonic()
                    if request.on_done:
                        request.on_done(request)
                    request.done.set()
                    continue
                self.occupant[r], self.filled[r], self.fresh[r] = request, 0, True

    def _prefill_one(self) -> bool:
        pending = [r for r, q in enumerate(self.occupant) if q is not None and self.filled[r] < len(q.prompt)]
        if not pending:
            return False
        r = min(pending, key=lambda i: self.occupant[i].submitted)  # first come, first prefilled
        request, start = self.occupant[r], self.filled[r]
        n = min(PREFILL_CHUNK, len(request.prompt) - start)
        tokens, following = np.zeros(PREFILL_CHUNK, np.int32), np.zeros(PREFILL_CHUNK, np.int32)
        tokens[:n] = request.prompt[start : start + n]
        ahead = request.prompt[start + 1 : start + 1 + n]
        following[: len(ahead)] = ahead
        lora, params, select = self._weights([request.adapter])
        self.cache, last, scores = _prefill_chunk(
            self.cfg,
            lora,
            request.prompt_logprobs,
            params,
            self.cache,
            select,
            r,
            tokens,
            following,
            start,
            n,
            self.fresh[r],
        )
        self.fresh[r], self.filled[r] = False, start + n
        if request.prompt_logprobs:
            lp, ids, top = (np.asarray(a) for a in scores)
            request.prompt_scores += [(float(lp[i]), ids[i], top[i]) for i in range(len(ahead))]
        if self.filled[r] == len(request.prompt):
            if request.max_tokens == 0:
                self._finish(r, "length")
            else:
                settings = (request.temperature, request.top_k, request.top_p, request.seed)
                first, scores = _first_token(last, *(np.asarray(v) for v in settings))
                self._emit(r, int(first[0]), *(np.asarray(a)[0] for a in scores))
        return True

    def _decode(self) -> bool:
        rows = [r for r, q in enumerate(self.occupant) if q is not None and self.filled[r] == len(q.prompt)]
        if not rows:
            return False
        active = np.zeros(self.rows, bool)
        active[rows] = True
        sampling = np.zeros((5, self.rows), np.float64)
        for r in rows:
            q = self.occupant[r]
            sampling[:, r] = (q.temperature, q.top_k, q.top_p, q.seed, len(q.tokens))
        temperature, top_p = sampling[0].astype(np.float32), sampling[2].astype(np.float32)
        top_k, seeds, steps = sampling[1].astype(np.int32), sampling[3].astype(np.uint32), sampling[4].astype(np.uint32)
        tokens = np.asarray(self.last, np.int32)
        want_top = any(self.occupant[r].top_logprobs for r in rows)
        lora, params, select = self._weights([q.adapter if q is not None else None for q in self.occupant])
        sampling = (temperature, top_k, top_p, seeds, steps)
        n = next(b for b in self.buckets if b > max(rows))
        first = lambda a: None if a is None else a[:n]  # noqa: E731
        sampling = tuple(first(a) for a in sampling)
        self.cache, nxt, scores = _decode_step(
            self.cfg, lora, n, params, self.cache, first(select), tokens[:n], active[:n], sampling, want_top
        )
        nxt, (lp, ids, top) = np.asarray(nxt), (np.asarray(a) for a in scores)
        for r in rows:
            self._emit(r, int(nxt[r]), lp[r], ids[r], top[r])
        return True

    def _weights(self, adapters: list[str | None]):
        """(lora view, params, selector) for rows of these adapters: the base alone when none has one."""
        if all(a is None for a in adapters):
            return None, self.params, None
        return self.bank.lora, self.bank.params, self.bank.select(adapters)

    def _emit(self, r: int, token: int, logprob, top_ids, top_logprobs) -> None:
        request = self.occupant[r]
        request.tokens.append(token)
        self.last[r], self.generated = token, self.generated + 1
        if request.first_token_at is None:
            request.first_token_at = time.monotonic()
        stop = request.on_token(request, token, float(logprob), top_ids, top_logprobs) if request.on_token else False
        if token == self.cfg.eos_id or stop:
            self._finish(r, "stop")
        elif len(request.tokens) >= request.max_tokens:
            self._finish(r, "length")

    def _finish(self, r: int, reason: str) -> None:
        request, self.occupant[r] = self.occupant[r], None
        request.finish_reason, request.finished_at = reason, time.monotonic()
        if request.on_done:
            request.on_done(request)
        request.done.set()
