"""The continuous-batching engine: each request's tokens are what it gets alone."""

import jax
import numpy as np
import pytest

from moe import model as M
from moe.infer import generate
from moe.quant.params import quantize_params
from moe.serve.engine import Engine, EngineError, Request

from helpers import tiny_model


@pytest.fixture(scope="module", params=["moe", "window"])
def model(request):
    if request.param == "moe":
        cfg = tiny_model(max_seq_len=160)
    else:  # a dense model whose ring cache is shorter than the prompts
        cfg = tiny_model(n_experts=0, top_k=0, sliding_window=5, max_seq_len=160)
    return cfg, M.init(cfg, jax.random.key(1))


def prompts(n):
    rng = np.random.default_rng(0)
    lengths = [3, 70, 1, 130, 17, 9, 64][:n]  # across prefill-chunk boundaries (64 tokens)
    return [[1, *rng.integers(2, 97, size=length - 1).tolist()] for length in lengths]


def run_all(engine, requests):
    for r in requests:
        engine.submit(r)
    while not all(r.done.is_set() for r in requests):
        engine.step()
    return [r.tokens for r in requests]


def test_greedy_output_equals_generate_alone_whatever_the_batch(model):
    cfg, params = model
    ps = prompts(7)
    engine = Engine(cfg, params, rows=3, max_seq_len=160)  # fewer rows than requests: admission between steps
    requests = [Request(p, max_tokens=12) for p in ps]
    served = run_all(engine, requests)
    assert served == generate(cfg, params, ps, max_new_tokens=12, batch_size=len(ps))  # each row as alone
    assert {r.finish_reason for r in requests} <= {"length", "stop"}


def test_no_recompiles_after_warm_up(model):
    cfg, params = model
    engine = Engine(cfg, params, rows=5, max_seq_len=160)
    assert engine.buckets == [1, 2, 4, 5]
    engine.warm_up()
    compiled = engine.compiles()
    run_all(engine, [Request(p, max_tokens=n) for p, n in zip(prompts(7), [1, 5, 9, 2, 7, 3, 4])])
    assert engine.compiles() == compiled


def test_seeded_sampling_equals_generate_and_prompt_scores_are_the_models(model):
    cfg, params = model
    p = prompts(2)[1]
    engine = Engine(cfg, params, rows=2, max_seq_len=160)
    sampled = Request(p, max_tokens=8, temperature=0.8, top_k=20, seed=3)
    scored = Request(p, max_tokens=0, prompt_logprobs=True)
    run_all(engine, [sampled, scored])
    assert sampled.tokens == generate(cfg, params, [p], 8, temperature=0.8, top_k=20, seed=3)[0]
    logits = np.asarray(jax.nn.log_softmax(M.logits(cfg, params, np.asarray([p]))[0]))
    expected = logits[np.arange(len(p) - 1), p[1:]]
    np.testing.assert_allclose([s[0] for s in scored.prompt_scores], expected, atol=2e-5)
    assert scored.tokens == [] and scored.finish_reason == "length"


def test_bad_requests_are_refused_with_the_fix(model):
    cfg, params = model
    engine = Engine(cfg, params, rows=1, max_seq_len=160)
    with pytest.raises(EngineError, match="empty"):
        engine.submit(Request([], max_tokens=1))
    with pytest.raises(EngineError, match=r"in \[0, 97\)"):
        engine.submit(Request([1, 97], max_tokens=1))
    if cfg.sliding_window is None:
        with pytest.raises(EngineError, match="at most 60 tokens"):
            engine.submit(Request([1] * 100, max_tokens=61))


def test_a_cancelled_request_frees_its_row_for_the_next(model):
    cfg, params = model
    engine = Engine(cfg, params, rows=1, max_seq_len=160)
    first, second = Request([1, 5, 6], max_tokens=50), Request([1, 7], max_tokens=3)
    engine.submit(first)
    engine.submit(second)
    engine.step()
    engine.step()
    first.cancel()
    while not second.done.is_set():
        engine.step()
    assert first.finish_reason == "cancelled" and len(first.tokens) < 50
    assert second.tokens == generate(cfg, params, [[1, 7]], 3)[0]


def test_a_quantized_base_serves_what_generate_gives(model):
    cfg, params = model
    quantized = quantize_params(params, "nf4")
    ps = prompts(3)
    engine = Engine(cfg, quantized, rows=2, max_seq_len=160)
    assert run_all(engine, [Request(p, max_tokens=6) for p in ps]) == generate(cfg, quantized, ps, 6, batch_size=3)
