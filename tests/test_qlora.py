"""QLoRA: LoRA over a frozen quantized base. Train steps leave the base's codes bit-identical
and give the adapters the gradients of LoRA over the dequantized base; a run starts from a
`moe quantize` output and merges into the dequantized weights; `moe quantize` refuses what
it cannot do with one line and no partial folder; `moe params --quant` and the config."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from test_tune_loop import TOKENIZER, _base, _cfg, _rows

import moe.model as model_lib
from moe import cli
from moe import config as config_lib
from moe.checkpoint.params import restore_params
from moe.infer import source as source_lib
from moe.model.lora import is_adapter
from moe.quant.params import dequantize_params, quantize_params
from moe.training import loop
from moe.training import step as train_lib
from moe.training import trainable as trainable_lib

from helpers import tiny_model


def _qlora_config(fmt="nf4-dq"):
    model = tiny_model(d_model=64, d_ff=128, n_heads=4, n_kv_heads=2, head_dim=16)
    return config_lib.Config(
        model=model,
        lora=config_lib.LoRAConfig(rank=4, alpha=8.0, targets=("q", "v", "mlp")),
        quant=config_lib.QuantConfig(base=fmt),
        train=config_lib.TrainConfig(batch_size=4, seq_len=16, lr=1e-2, warmup_steps=0, init_from="base"),
    )


def _batch(cfg, seed=0):
    tokens = np.random.default_rng(seed).integers(0, cfg.model.vocab_size, (4, 17))
    pos = np.broadcast_to(np.arange(16), (4, 16))
    return {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "segment_ids": jnp.ones((4, 16), jnp.int32),
        "positions": jnp.asarray(pos, jnp.int32),
    }


def test_qlora_steps_keep_the_base_bit_identical_and_train_only_adapters():
    cfg = _qlora_config()
    params = train_lib.fresh_params(cfg, jax.random.key(0))
    trainable, frozen = trainable_lib.split(cfg, params)
    frozen_q = quantize_params(frozen, "nf4-dq")
    codes_before = [np.array(x) for x in jax.tree_util.tree_leaves(frozen_q)]
    batch = _batch(cfg)

    # the adapters' gradients are LoRA's over the dequantized base: gradients flow through the codes
    _, grads_q, _ = jax.jit(lambda t: train_lib.grads_and_metrics(cfg, t, batch, frozen_q))(trainable)
    _, grads_dq, _ = jax.jit(lambda t: train_lib.grads_and_metrics(cfg, t, batch, dequantize_params(frozen_q)))(
        trainable
    )
    for a, b in zip(jax.tree_util.tree_leaves(grads_q), jax.tree_util.tree_leaves(grads_dq)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * np.abs(np.asarray(b)).max())
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree_util.tree_leaves(grads_q))

    opt = train_lib.make_optimizer(cfg, trainable)
    step, _ = train_lib.jit_steps(cfg, opt)
    state = train_lib.state_from(cfg, jax.tree_util.tree_map(jnp.copy, trainable))
    for i in range(3):
        state, metrics = step(state, _batch(cfg, i), frozen_q)
    assert np.isfinite(float(metrics["loss"]))
    for before, after in zip(codes_before, jax.tree_util.tree_leaves(frozen_q)):
        np.testing.assert_array_equal(before, np.asarray(after))  # the 4-bit base, untouched
    moved = {
        p: np.abs(np.asarray(v) - np.asarray(traverse_util.flatten_dict(trainable)[p])).max()
        for p, v in traverse_util.flatten_dict(state.params).items()
    }
    assert all(is_adapter(p) for p in moved) and all(d > 0 for p, d in moved.items() if p[-1].endswith("_lora_b"))


@pytest.mark.slow
def test_qlora_run_from_a_quantized_checkpoint_merges_into_the_dequantized_base(tmp_path):
    base_dir, base_cfg, _ = _base(tmp_path)
    quantized = tmp_path / "base-nf4"
    assert cli.main(["quantize", str(base_dir), str(quantized), "--format", "nf4"]) == 0
    stored_before = [np.array(x) for x in jax.tree_util.tree_leaves(restore_params(quantized / "params"))]
    cfg = _cfg(
        quantized,
        base_cfg,
        _rows(tmp_path),
        lora={"rank": 4, "alpha": 8.0, "targets": ["q", "mlp"]},
        quant={"base": "nf4"},
    )
    run = tmp_path / "run"
    loop.run(cfg, run, progress=False)
    assert "the frozen base is held in nf4" in (run / "train.log").read_text()
    saved = traverse_util.flatten_dict(restore_params(run / "checkpoints" / "3" / "params"))
    assert saved and all(is_adapter(p) for p in saved)  # adapters only: the base stays in its 4-bit folder
    for a, b in zip(stored_before, jax.tree_util.tree_leaves(restore_params(quantized / "params"))):
        np.testing.assert_array_equal(a, np.asarray(b))

    # merged on load into the dequantized base (float32), never into the 4-bit codes
    merged = source_lib.load(run)
    assert merged.config.quant.base is None and merged.config.lora.rank is None
    base = source_lib.load(quantized, tokenizer=TOKENIZER)
    adapters = traverse_util.unflatten_dict(saved)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 4096, (2, 10)), jnp.int32)
    trained = model_lib.apply(
        cfg.model, trainable_lib.combine(cfg, adapters, base.params), tokens, lora=trainable_lib.lora_of(cfg)
    )[0]
    np.testing.assert_allclose(
        np.asarray(model_lib.logits(merged.model, merged.params, tokens)), np.asarray(trained), rtol=1e-4, atol=1e-4
    )


def test_moe_quantize_refuses_with_one_line_and_leaves_no_folder(tmp_path, capsys, terminal):
    base_dir, _, _ = _base(tmp_path)
    with pytest.raises(SystemExit) as exit_info:  # a closed set of formats: argparse's choices
        cli.main(["quantize", str(base_dir), str(tmp_path / "q1"), "--format", "nf5"])
    assert exit_info.value.code == 2 and "invalid choice: 'nf5'" in capsys.readouterr().err
    for args, message in [
        ([str(tmp_path / "nowhere"), str(tmp_path / "q1"), "--format", "nf4"], "no such directory"),
    ]:
        assert cli.main(["quantize", *args]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
        assert not (tmp_path / "q1").exists() and not (tmp_path / "q1.partial").exists()
    assert cli.main(["quantize", str(base_dir), str(tmp_path / "q1") + "/", "--format", "int8"]) == 0
    assert "quantizing to int8:   0%" in terminal.getvalue()
    assert cli.main(["quantize", str(tmp_path / "q1"), str(tmp_path / "q2"), "--format", "nf4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "already quantized (int8)" in err
    assert not (tmp_path / "q2").exists() and not (tmp_path / "q2.partial").exists()


def test_moe_params_quant_prints_the_bytes_of_every_format(capsys):
    assert cli.main(["params", "configs/mixtral-8x7b.yaml", "--quant", "nf4-dq"]) == 0
    rows = {
        line.split()[0]: line.split()
        for line in capsys.readouterr().out.splitlines()
        if line.split() and line.split()[0] in ("bfloat16", "int8", "int4", "nf4", "nf4-dq")
    }
    assert float(rows["bfloat16"][1]) == pytest.approx(93.4, abs=0.1)  # GB
    assert float(rows["nf4-dq"][1]) == pytest.approx(24.5, abs=0.1)
    assert float(rows["nf4-dq"][3]) == pytest.approx(4.127, abs=0.001) and rows["nf4-dq"][-1] == "<-"
    assert float(rows["int8"][1]) < float(rows["bfloat16"][1]) / 1.9


def test_quant_config_is_checked():
    with pytest.raises(config_lib.ConfigError, match="only LoRA keeps frozen"):
        config_lib.load("configs/tiny-moe.yaml", ["quant.base=nf4", "train.init_from=somewhere"])
    with pytest.raises(config_lib.ConfigError, match="must be one of"):
        config_lib.load("configs/tiny-moe.yaml", ["quant.base=fp4"])
    cfg = dataclasses.replace(_qlora_config("int4"), model=tiny_model(d_model=32))
    with pytest.raises(ValueError, match="divisible by 64"):
        quantize_params(train_lib.fresh_params(cfg, jax.random.key(0)), "int4")
