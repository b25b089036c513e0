import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe.model as M
from moe import config as C
from moe.training import step as T

from helpers import ROOT, tiny_model


def run_config(**train):
    model = tiny_model(n_experts=4, top_k=2)
    return C.Config(
        model=model,
        train=dataclasses.replace(C.TrainConfig(seq_len=16, batch_size=4, lr=1e-2, warmup_steps=0, steps=50), **train),
    )


def fixed_batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    b, s = cfg.train.batch_size, cfg.train.seq_len
    tokens = rng.integers(0, cfg.model.vocab_size, size=(b, s + 1))
    segments = np.ones((b, s), np.int32)
    segments[1, 10:] = 2  # two documents in row 1
    segments[2, 12:] = 0  # padding at the end of row 2
    positions = np.where(segments == 2, np.arange(s) - 10, np.arange(s))
    return {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "segment_ids": jnp.asarray(segments),
        "positions": jnp.asarray(positions, jnp.int32),
    }


def numpy_nll(logits, batch):
    """-log p(target) per position in float64 NumPy (log-sum-exp written out), and the
    mask of real tokens: an implementation independent of the training code."""
    z = np.asarray(logits, np.float64)
    top = z.max(-1, keepdims=True)
    log_norm = top[..., 0] + np.log(np.exp(z - top).sum(-1))
    target = np.take_along_axis(z, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    return log_norm - target, np.asarray(batch["segment_ids"]) != 0


def test_a_few_steps_on_a_fixed_batch_lower_the_loss():
    cfg = run_config()
    state = T.init_state(cfg, jax.random.key(0))
    step, _ = T.jit_steps(cfg, T.make_optimizer(cfg, state.params))
    batch, losses = fixed_batch(cfg), []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 1.0, losses
    assert int(state.step) == 8


def test_the_cpu_train_step_compiles_with_the_memory_optimized_scheduler():
    # The scheduler keeps fewer scan stacks live at once; on CPU the step must hold fewer
    # temporaries than the same step under XLA's default scheduler. (That TPU plans get no
    # CPU options is tested in test_aot.py.)
    cfg = run_config()
    state = T.init_state(cfg, jax.random.key(0))
    optimizer = T.make_optimizer(cfg, state.params)
    assert T.compiler_options() == T.CPU_COMPILER_OPTIONS
    step, _ = T.jit_steps(cfg, optimizer)
    plain = jax.jit(T._with_rules(cfg, functools.partial(T.train_step, cfg, optimizer)), donate_argnums=0)
    args = (state, fixed_batch(cfg), {})
    temp = {
        name: f.lower(*args).compile().memory_analysis().temp_size_in_bytes
        for name, f in (("ours", step), ("default", plain))
    }
    assert temp["ours"] < temp["default"], temp


@pytest.mark.slow
def test_gradients_reach_the_router_and_every_expert():
    cfg = run_config(batch_size=8)
    state = T.init_state(cfg, jax.random.key(1))
    _, grads, metrics = T.grads_and_metrics(cfg, state.params, fixed_batch(cfg))
    g = grads["layers"]["moe"]
    assert np.all(np.abs(np.asarray(g["gate"])).sum(axis=(1,)) > 0)  # every layer, every expert column
    for name in ("w1", "w2", "w3"):
        per_expert = np.abs(np.asarray(g[name])).sum(axis=(2, 3))  # [layers, experts]
        assert np.all(per_expert > 0), (name, per_expert)
    assert np.all(np.asarray(metrics["expert_load"]) > 0)


def test_freezing_the_router_keeps_it_and_trains_the_rest():
    cfg = run_config(freeze_router=True)
    state = T.init_state(cfg, jax.random.key(2))
    gate_before = np.asarray(state.params["layers"]["moe"]["gate"])
    w1_before = np.asarray(state.params["layers"]["moe"]["w1"])
    step, _ = T.jit_steps(cfg, T.make_optimizer(cfg, state.params))
    state, _ = step(state, fixed_batch(cfg))
    np.testing.assert_array_equal(np.asarray(state.params["layers"]["moe"]["gate"]), gate_before)
    assert not np.array_equal(np.asarray(state.params["layers"]["moe"]["w1"]), w1_before)


def test_balancing_loss_pushes_a_skewed_router_toward_balance():
    from moe.model.moe import load_balancing_loss, route, router_stats

    n_tokens, d_model, n_experts = 256, 16, 4
    x = jax.random.normal(jax.random.key(0), (n_tokens, d_model)) + 1.0  # tokens share a direction
    gate = 0.1 * jax.random.normal(jax.random.key(1), (d_model, n_experts))
    gate = gate.at[:, 0].add(0.3)  # ... which the router maps to expert 0

    def aux_and_load(gate):
        logits = x @ gate
        probs, _, idx = route(logits, 2)
        stats = router_stats(logits, probs, idx, jnp.ones(n_tokens, bool))
        aux = load_balancing_loss(stats["expert_counts"], stats["prob_sum"], stats["n_tokens"])
        return aux, stats["expert_counts"] / (2 * n_tokens)

    @jax.jit
    def descend(gate):
        step = lambda g, _: (g - 0.5 * jax.grad(lambda g: aux_and_load(g)[0])(g), None)
        return jax.lax.scan(step, gate, length=100)[0]

    aux0, load0 = aux_and_load(gate)
    aux1, load1 = aux_and_load(descend(gate))
    assert float(load0[0]) > 0.45  # expert 0 takes nearly every token as one of its two
    assert float(aux1) < float(aux0) - 0.2
    assert float(jnp.max(load1) - jnp.min(load1)) < 0.5 * float(jnp.max(load0) - jnp.min(load0)), (load0, load1)


@pytest.mark.parametrize("n_experts", [0, 4], ids=["dense", "moe"])
def test_gradient_accumulation_matches_one_big_batch(n_experts):
    # MoE: the balancing loss is not a sum over micro-batches (counts x probabilities); the
    # step must use the whole batch's counts for the sums to match one big batch
    cfg = dataclasses.replace(run_config(), model=tiny_model(n_experts=n_experts, top_k=2))
    params = T.init_state(cfg, jax.random.key(4)).params
    batch = fixed_batch(cfg)
    loss1, g1, m1 = jax.jit(lambda p, b: T.grads_and_metrics(cfg, p, b))(params, batch)
    cfg4 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=4))
    loss4, g4, m4 = jax.jit(lambda p, b: T.grads_and_metrics(cfg4, p, b))(params, batch)
    assert abs(float(loss1 - loss4)) < 1e-5
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g4)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5
    assert set(m1) == set(m4)
    for key in m1:
        np.testing.assert_allclose(np.asarray(m4[key]), np.asarray(m1[key]), atol=1e-6, err_msg=key)
    if n_experts:  # the micro-batches route differently, so per-micro-batch losses would not do
        assert float(m1["aux_loss"]) > 0


def test_non_finite_gradients_skip_the_step_and_are_counted():
    cfg = run_config()
    state = T.init_state(cfg, jax.random.key(5))
    step, _ = T.jit_steps(cfg, T.make_optimizer(cfg, state.params))
    before = jax.tree_util.tree_map(np.asarray, state.params)
    bad = dict(state.params, final_norm={"scale": state.params["final_norm"]["scale"].at[0].set(jnp.nan)})
    state = T.TrainState(state.step, bad, state.opt_state)
    state, metrics = step(state, fixed_batch(cfg))
    assert int(metrics["nonfinite_consecutive"]) == 1 and int(metrics["nonfinite_total"]) == 1
    np.testing.assert_array_equal(np.asarray(state.params["lm_head"]["kernel"]), before["lm_head"]["kernel"])


def test_weight_decay_skips_norms():
    mask = T.decay_mask(M.init(tiny_model(), jax.random.key(0)))
    assert mask["final_norm"]["scale"] is False and mask["layers"]["attn_norm"]["scale"] is False
    assert mask["layers"]["moe"]["w1"] is True and mask["embed"]["embedding"] is True


@pytest.mark.parametrize("loss_chunk", [4, None])
def test_fused_loss_equals_the_plain_loss_in_value_and_every_gradient(loss_chunk):
    # seq 16 in blocks of 4 (None: one block of 16), two packed documents and padding (fixed_batch)
    plain = run_config(fused_loss=False)
    fused = run_config(loss_chunk=loss_chunk)
    params = T.init_state(plain, jax.random.key(7)).params
    batch = fixed_batch(plain)
    loss1, g1, m1 = jax.jit(lambda p, b: T.grads_and_metrics(plain, p, b))(params, batch)
    loss4, g4, m4 = jax.jit(lambda p, b: T.grads_and_metrics(fused, p, b))(params, batch)
    assert abs(float(loss1 - loss4)) <= 1e-5 and abs(float(m1["ce_loss"] - m4["ce_loss"])) <= 1e-5
    for path, a in jax.tree_util.tree_leaves_with_path(g1):
        b = g4
        for key in path:
            b = b[key.key]
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5, jax.tree_util.keystr(path)


def test_loss_chunk_must_divide_seq_len_and_needs_the_fused_loss():
    cfg = run_config()
    with pytest.raises(C.ConfigError, match="train.loss_chunk \\(5\\) must divide train.seq_len \\(16\\)"):
        C.validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loss_chunk=5)))
    with pytest.raises(C.ConfigError, match="applies to the fused loss"):
        C.validate(run_config(loss_chunk=4, fused_loss=False))


@pytest.mark.slow
def test_loss_ignores_padding_and_matches_manual_cross_entropy():
    cfg = run_config()
    params = T.init_state(cfg, jax.random.key(6)).params
    batch = fixed_batch(cfg)
    terms = T.loss_terms(cfg, params, batch)
    logits, _ = M.apply(cfg.model, params, batch["inputs"], batch["positions"], batch["segment_ids"])
    nll, mask = numpy_nll(logits, batch)
    assert float(terms["n_tokens"]) == mask.sum()
    np.testing.assert_allclose(float(terms["ce_sum"]), nll[mask].sum(), rtol=1e-5)


@pytest.mark.slow
def test_total_loss_is_ce_plus_weighted_router_losses_each_from_hugging_face(tmp_path):
    import torch
    from transformers import MixtralForCausalLM

    from moe.convert import save_hf

    cfg = run_config(aux_loss_coef=0.3, z_loss_coef=0.05)  # coefficients that tell the terms apart
    params = jax.device_get(T.init_state(cfg, jax.random.key(8)).params)
    tokens = np.random.default_rng(8).integers(0, cfg.model.vocab_size, size=(4, cfg.train.seq_len + 1))
    s = cfg.train.seq_len
    batch = {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "segment_ids": jnp.ones((4, s), jnp.int32),
        "positions": jnp.tile(jnp.arange(s, dtype=jnp.int32), (4, 1)),
    }
    loss, _, metrics = T.grads_and_metrics(cfg, params, batch)

    save_hf(cfg.model, params, tmp_path / "hf")
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    mask = torch.ones(tokens.shape, dtype=torch.long)
    mask[:, -1] = 0  # HF sees one token more; the last is left out of the router statistics
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(tokens), attention_mask=mask, output_router_logits=True)
    nll, _ = numpy_nll(out.logits.numpy()[:, :-1], batch)
    ce = nll.mean()
    router = [
        layer.numpy().reshape(4, s + 1, -1)[:, :-1].reshape(-1, cfg.model.n_experts) for layer in out.router_logits
    ]
    z = np.mean([np.log(np.exp(r.astype(np.float64)).sum(-1)) ** 2 for r in router])
    aux = float(out.aux_loss)  # HF's load_balancing_loss_func over every layer, padding masked
    assert float(metrics["ce_loss"]) == pytest.approx(ce, rel=1e-5)
    assert float(metrics["aux_loss"]) == pytest.approx(aux, rel=1e-5)
    assert float(metrics["z_loss"]) == pytest.approx(z, rel=1e-5)
    assert float(loss) == pytest.approx(ce + 0.3 * aux + 0.05 * z, rel=1e-5)


def test_validation_loss_equals_numpy_cross_entropy_over_the_same_batches():
    from moe.training.loop import _evaluate

    cfg = run_config()
    params = T.init_state(cfg, jax.random.key(9)).params
    batches = [fixed_batch(cfg, seed) for seed in (1, 2)]
    _, eval_step = T.jit_steps(cfg, T.make_optimizer(cfg, params))
    got = _evaluate(eval_step, params, None, batches)
    nll_sum, count = 0.0, 0
    for batch in batches:
        logits, _ = M.apply(cfg.model, params, batch["inputs"], batch["positions"], batch["segment_ids"])
        nll, mask = numpy_nll(logits, batch)
        nll_sum, count = nll_sum + nll[mask].sum(), count + mask.sum()
    assert got["val_loss"] == pytest.approx(nll_sum / count, rel=1e-5)
    assert got["val_ppl"] == pytest.approx(np.exp(nll_sum / count), rel=1e-5)


def test_flops_per_token_and_mfu_against_a_hand_count():
    # tiny-moe: 4 layers, d_model 128, 4 heads of 32, 2 kv heads, d_ff 256, 8 experts top-2,
    # vocab 32000, seq_len 128. Active matmul weights per token, by hand:
    #   attention  128 * 32 * (4 + 2 + 2 + 4)   = 49,152 per layer
    #   router     128 * 8                       =  1,024 per layer
    #   experts    2 * 3 * 128 * 256             = 196,608 per layer
    #   lm_head    128 * 32000                   = 4,096,000 (the embedding lookup costs nothing)
    # 6 FLOPs per weight (forward + backward) plus attention 12 * layers * seq * heads * head_dim
    cfg = C.load(ROOT / "configs/tiny-moe.yaml", ["train.seq_len=128"])
    weights = 4 * (49_152 + 1_024 + 196_608) + 4_096_000
    want = 6 * weights + 12 * 4 * 128 * 4 * 32
    from moe.model.params import count_params

    assert T.flops_per_token(cfg, count_params(cfg.model).active) == want
    from moe.training.metrics import step_record

    metrics = {k: 0.0 for k in ("loss", "ce_loss", "aux_loss", "z_loss", "grad_norm", "lr", "nonfinite_total")}
    record = step_record(3, metrics, tokens=1024.0, seconds=0.5, flops_per_token=want, peak=1e11)
    assert record["tokens_per_s"] == 2048.0 and record["mfu"] == pytest.approx(2048.0 * want / 1e11)
