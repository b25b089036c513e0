"""Generation with the KV cache: against transformers' generate, against the full forward,
the ring of W slots, batching, sampling filters and seeds, eos."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import moe.model as M
from moe.convert import load_hf
from moe.infer import GenerationError, Sampling, SamplingError, generate
from moe.infer.sampling import sample, top_k_filter, top_p_filter
from moe.model import kv_cache
from moe.model.transformer import Transformer

from helpers import tiny_model
from hf_models import make_hf

WINDOW = 5  # the mistral-window variant's sliding window


def _prompt(n, vocab=97, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def _hf_greedy(hf_dir, prompt, new):
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=model.config.eos_token_id,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("variant", ["mistral-window", "mixtral"])
def test_greedy_tokens_equal_transformers_generate(tmp_path, variant):
    hf_dir = make_hf(tmp_path, variant, seed=3)
    cfg, params = load_hf(hf_dir)
    prompt, new = _prompt(9), 4 * WINDOW  # prompt + new tokens span the window four times
    ours = generate(cfg, params, [prompt], new)[0]
    theirs = _hf_greedy(hf_dir, prompt, new)
    assert len(theirs) >= 3 * WINDOW, "the reference stopped early at eos: pick another seed"
    assert ours == theirs


def _feed_in_chunks(cfg, params, tokens, sizes, slots):
    """Logits of every position, fed through the cache in chunks of the given sizes."""
    cache = kv_cache.init(cfg, 1, slots)
    model, logits, start = Transformer(cfg), [], 0
    for size in sizes:
        pos = jnp.arange(start, start + size)[None]
        out, _, cache = model.apply({"params": params}, tokens[:, start : start + size], pos, cache=cache)
        logits.append(out)
        start += size
    return jnp.concatenate(logits, axis=1), cache


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.slow
def test_cached_logits_equal_the_full_forward_at_every_position(window):
    cfg = tiny_model(sliding_window=window, max_seq_len=64)
    params = M.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 20), 0, cfg.vocab_size)
    full = M.logits(cfg, params, tokens)
    slots = kv_cache.slots_needed(cfg, 20)
    # a first chunk longer than the window, one shorter, then single-token decode steps
    cached, cache = _feed_in_chunks(cfg, params, tokens, [7, 3] + [1] * 10, slots)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-4, rtol=0)
    if window is not None:  # the ring holds exactly W slots: the last W positions, p at p % W
        assert cache["k"].shape[2] == window and cache["pos"].shape == (1, window)
        expected = np.zeros(window, int)
        for p in range(20 - window, 20):
            expected[p % window] = p
        np.testing.assert_array_equal(np.asarray(cache["pos"][0]), expected)
        assert int(cache["end"][0]) == 20


@pytest.mark.parametrize("moe,layout_rows", [(True, 1), (True, 8), (False, 2), (True, None)])
@pytest.mark.slow
def test_decode_layout_views_the_same_memory_and_decodes_like_the_stacked_tree(moe, layout_rows):
    """moe/infer/layout.py: per-layer trees and (few rows) per-expert buffers that alias the
    stacked arrays, and the decode loop's logits and cache through them equal the stacked
    path's (the training model's nn.scan). layout_rows None: the prefill's layout, experts
    kept stacked per layer."""
    from moe.infer.layout import decode_layout
    from moe.model.experts import ExpertList

    cfg = tiny_model(sliding_window=4, max_seq_len=64, **({} if moe else {"n_experts": 0}))
    params = jax.tree_util.tree_map(np.asarray, M.init(cfg, jax.random.key(4)))
    layout = decode_layout(cfg, params, layout_rows)
    batch = layout_rows or 2
    split = moe and layout_rows is not None and batch * cfg.top_k <= cfg.n_experts
    assert split == isinstance(layout["layer_1"]["moe"]["w2"], ExpertList) if moe else "mlp" in layout["layer_1"]
    stacked = params["layers"]["attn"]["q"]  # layer 1's q starts one layer's size into the stack
    view = layout["layer_1"]["attn"]["q"]
    assert view.unsafe_buffer_pointer() == stacked.ctypes.data + stacked[0].nbytes
    if split:
        w2 = params["layers"]["moe"]["w2"]
        e3 = layout["layer_1"]["moe"]["w2"].experts[3]
        assert e3.unsafe_buffer_pointer() == w2.ctypes.data + (cfg.n_experts + 3) * w2[0, 0].nbytes

    tokens = jax.random.randint(jax.random.key(5), (batch, 9), 0, cfg.vocab_size)
    cache = kv_cache.init(cfg, batch, 4)
    _, _, cache = Transformer(cfg).apply(
        {"params": params}, tokens[:, :8], jnp.tile(jnp.arange(8), (batch, 1)), cache=cache
    )
    pos = jnp.full((batch, 1), 8)
    ref, _, ref_cache = Transformer(cfg).apply({"params": params}, tokens[:, 8:], pos, cache=cache)
    out, _, new_cache = jax.jit(
        lambda p, c: Transformer(cfg, layer_list=True).apply({"params": p}, tokens[:, 8:], pos, cache=c)
    )(layout, kv_cache.as_layer_list(cache))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.stack(new_cache["k"]), np.asarray(ref_cache["k"]), atol=1e-6, rtol=0)


def test_ring_slots_do_not_grow_with_the_generation():
    cfg = tiny_model(sliding_window=4, max_seq_len=32)
    assert kv_cache.slots_needed(cfg, 10_000) == 4
    assert kv_cache.slots_needed(dataclasses.replace(cfg, sliding_window=None), 100) == 100


def test_prompts_of_different_lengths_batch_like_alone():
    cfg = tiny_model(sliding_window=6, max_seq_len=64)
    params = M.init(cfg, jax.random.key(2))
    prompts = [_prompt(n, cfg.vocab_size, seed=n) for n in (3, 11, 17)]
    together = generate(cfg, params, prompts, 12)
    alone = [generate(cfg, params, [p], 12)[0] for p in prompts]
    assert together == alone


def test_top_k_and_top_p_keep_exactly_the_expected_tokens():
    probs = jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15], [0.2, 0.2, 0.2, 0.2, 0.2]])
    logits = jnp.log(probs)
    kept = np.isfinite(np.asarray(top_k_filter(logits, 2)))
    np.testing.assert_array_equal(kept[0], [False, True, False, True, False])
    assert kept[1].all()  # ties at the k-th value stay
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.75)))  # 0.4 + 0.3 < 0.75: 0.15 joins
    np.testing.assert_array_equal(kept[0], [False, True, False, True, True])
    np.testing.assert_array_equal(kept[1], [True, True, True, True, False])
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.3)))  # the top token always stays
    np.testing.assert_array_equal(kept[0], [False, True, False, False, False])
    draws = {
        int(sample(logits, Sampling(1.0, top_k=2), keys)[0])
        for keys in jax.random.split(jax.random.key(1), 200).reshape(100, 2)
    }
    assert draws == {1, 3}


def test_temperature_applies_before_the_filters():
    # probs [0.5, 0.3, 0.2] at T = 2 are proportional to sqrt(p): [0.415, 0.322, 0.263], so top-p 0.8
    # keeps all three (0.737 < 0.8 before the third); filtering the untempered probs would drop it
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: sample(logits, Sampling(2.0, top_p=0.8), k[None])[0])(keys))
    tempered = np.sqrt([0.5, 0.3, 0.2]) / np.sqrt([0.5, 0.3, 0.2]).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / len(draws), tempered, atol=0.03)
    # top-k after temperature: T never changes which tokens are the k most likely, only their odds
    draws = np.asarray(jax.vmap(lambda k: sample(logits, Sampling(2.0, top_k=2), k[None])[0])(keys))
    pair = tempered[:2] / tempered[:2].sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / len(draws), [*pair, 0.0], atol=0.03)


def test_same_seed_same_samples_and_another_seed_differs():
    cfg = tiny_model(max_seq_len=64)
    params = M.init(cfg, jax.random.key(0))
    prompts = [_prompt(5, cfg.vocab_size), _prompt(8, cfg.vocab_size, 1)]
    kw = dict(temperature=1.5, top_k=50, top_p=0.95)
    a = generate(cfg, params, prompts, 16, seed=7, **kw)
    assert a == generate(cfg, params, prompts, 16, seed=7, **kw)
    assert a != generate(cfg, params, prompts, 16, seed=8, **kw)


def test_eos_ends_a_row_while_the_others_continue():
    cfg = tiny_model(max_seq_len=64)
    params = M.init(cfg, jax.random.key(4))
    prompts = [_prompt(4, cfg.vocab_size, 1), _prompt(6, cfg.vocab_size, 2)]
    free = generate(cfg, params, prompts, 10)
    eos = next(t for t in free[0] if t not in free[1])  # a token of row 0 that row 1 never produces
    at = free[0].index(eos)
    assert at < 9, "row 0 must stop before the token budget does"
    stopped = generate(dataclasses.replace(cfg, eos_id=eos), params, prompts, 10)
    assert stopped[0] == free[0][: at + 1] and stopped[1] == free[1]


def test_bad_requests_are_refused_with_the_fix():
    cfg = tiny_model(max_seq_len=16)
    params = M.init(cfg, jax.random.key(0))
    with pytest.raises(GenerationError, match="max-new-tokens must be >= 1"):
        generate(cfg, params, [[1, 2]], 0)
    with pytest.raises(GenerationError, match="exceeds model.max_seq_len"):
        generate(cfg, params, [[1] * 12], 8)
    with pytest.raises(GenerationError, match="tokenizer does not match"):
        generate(cfg, params, [[1, cfg.vocab_size]], 2)
    with pytest.raises(SamplingError, match=r"top-p must be in \(0, 1\]"):
        generate(cfg, params, [[1, 2]], 2, temperature=1.0, top_p=1.5)
