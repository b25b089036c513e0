"""`moe upcycle`: a dense checkpoint into an MoE that computes exactly the dense model
(every dispatch path, expert parallelism over 8 devices, an HF Mistral folder out to an HF
Mixtral folder that transformers reads), noise that separates the experts, and refusals
that write nothing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import moe.model as model_lib
from moe import cli
from moe import config as config_lib
from moe.checkpoint.params import restore_params, save_params
from moe.model.dispatch import DISPATCH
from moe.parallel import mesh as mesh_lib
from moe.training import state as state_lib
from moe.training import step as train_lib

from helpers import tiny_model
from hf_models import SEQ, make_hf

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, SEQ)), jnp.int32)


def _write_config(path, cfg):
    path.write_text(config_lib.dump(cfg))
    return path


def _dense(tmp_path):
    cfg = config_lib.Config(model=tiny_model(n_experts=0), train=config_lib.TrainConfig(seq_len=32))
    save_params(tmp_path / "dense" / "params", model_lib.init(cfg.model, jax.random.key(0)))
    _write_config(tmp_path / "dense" / "config.yaml", cfg)
    return tmp_path / "dense", cfg


def _moe_config(tmp_path, cfg, n_experts=4, **model):
    moe = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_experts=n_experts, top_k=2, **model))
    name = "".join(f"-{k}{v}" for k, v in model.items())
    return _write_config(tmp_path / f"moe{n_experts}{name}.yaml", moe), moe


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("upcycle")
    dense_dir, dense = _dense(tmp_path)
    moe_yaml, moe = _moe_config(tmp_path, dense, n_experts=8)
    assert cli.main(["upcycle", str(dense_dir), str(moe_yaml), str(tmp_path / "out"), "--router-init", "normal"]) == 0
    reference = np.asarray(model_lib.logits(dense.model, restore_params(dense_dir / "params"), TOKENS))
    return tmp_path, dense_dir, dense, moe, restore_params(tmp_path / "out" / "params"), reference


@pytest.mark.parametrize("dispatch", sorted(DISPATCH))  # every path, new ones included
def test_upcycled_moe_computes_the_dense_model(upcycled, dispatch):
    _, _, _, moe, params, reference = upcycled
    out = model_lib.logits(dataclasses.replace(moe.model, moe_dispatch=dispatch), params, TOKENS)
    np.testing.assert_allclose(np.asarray(out), reference, atol=1e-5, rtol=0)


def test_upcycled_moe_computes_the_dense_model_with_experts_on_8_devices(upcycled):
    _, _, _, moe, params, reference = upcycled
    cfg = dataclasses.replace(moe, mesh=config_lib.MeshConfig(data=1, expert=8))
    mesh = mesh_lib.make_mesh(cfg)
    with jax.set_mesh(mesh):
        placed = jax.device_put(params, state_lib.param_shardings(cfg, mesh))
        fn = jax.jit(train_lib._with_rules(cfg, lambda p, t: model_lib.apply(cfg.model, p, t)[0]))
        out = fn(placed, TOKENS)
    np.testing.assert_allclose(np.asarray(out), reference, atol=1e-5, rtol=0)


def test_noise_separates_the_experts_and_keeps_the_router_init(upcycled):
    tmp_path, dense_dir, _, _, quiet, _ = upcycled
    moe_yaml = tmp_path / "moe8.yaml"
    assert (
        cli.main(["upcycle", str(dense_dir), str(moe_yaml), str(tmp_path / "noisy"), "--noise", "0.01", "--seed", "3"])
        == 0
    )
    noisy = restore_params(tmp_path / "noisy" / "params")
    dense_w1 = np.asarray(restore_params(dense_dir / "params")["layers"]["mlp"]["w1"])  # [layers, d, f]
    w1 = np.asarray(noisy["layers"]["moe"]["w1"])  # [layers, experts, d, f]
    assert not np.allclose(w1[:, 0], w1[:, 1])  # experts differ
    diff = w1 - dense_w1[:, None]
    assert abs(diff.std() - 0.01) < 0.001 and abs(diff.mean()) < 0.001  # by noise of the asked size
    np.testing.assert_array_equal(np.asarray(noisy["layers"]["moe"]["gate"]), 0.0)  # the zeros router
    assert np.asarray(quiet["layers"]["moe"]["gate"]).std() > 0  # the fixture's normal one


def test_hf_mistral_upcycles_and_converts_to_a_mixtral_transformers_reads(tmp_path, terminal):
    from transformers import AutoModelForCausalLM

    hf_dir = make_hf(tmp_path, "mistral-head-dim")
    dense_model = AutoModelForCausalLM.from_pretrained(hf_dir)
    from moe.convert.hf import read_hf_config

    model, _ = read_hf_config(hf_dir)
    moe = config_lib.Config(
        model=dataclasses.replace(model, n_experts=4, top_k=2), train=config_lib.TrainConfig(seq_len=32)
    )
    moe_yaml = _write_config(tmp_path / "moe.yaml", moe)
    assert cli.main(["upcycle", str(hf_dir), str(moe_yaml), str(tmp_path / "moe") + "/"]) == 0
    assert cli.main(["convert", "to-hf", str(tmp_path / "moe"), str(tmp_path / "mixtral")]) == 0
    assert "upcycling:   0%" in terminal.getvalue() and "writing Hugging Face tensors:   0%" in terminal.getvalue()
    mixtral = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral")
    assert type(mixtral).__name__ == "MixtralForCausalLM"
    ids = torch.tensor(np.asarray(TOKENS))
    with torch.no_grad():
        np.testing.assert_allclose(mixtral(ids).logits.numpy(), dense_model(ids).logits.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dispatch", ["grouped", "gather", "dense"])
def test_fine_grained_upcycling_splits_the_mlp_and_computes_the_dense_model(upcycled, tmp_path, dispatch):
    _, dense_dir, dense, _, _, reference = upcycled
    fields = dict(d_ff=12, top_k=8, routed_scale=4.0, balance="bias")  # 48 = 4 slices of 12; 2 of each chosen
    moe = dataclasses.replace(dense, model=dataclasses.replace(dense.model, n_experts=16, **fields))
    moe_yaml = _write_config(tmp_path / "fine.yaml", moe)
    assert cli.main(["upcycle", str(dense_dir), str(moe_yaml), str(tmp_path / "fine")]) == 0
    params = restore_params(tmp_path / "fine" / "params")
    dense_w2 = np.asarray(restore_params(dense_dir / "params")["layers"]["mlp"]["w2"])  # [layers, 48, d]
    np.testing.assert_array_equal(np.asarray(params["layers"]["moe"]["w2"])[:, 6], dense_w2[:, 24:36])  # slice 6 % 4
    np.testing.assert_array_equal(np.asarray(params["layers"]["moe"]["bias"]), 0.0)
    out = model_lib.logits(dataclasses.replace(moe.model, moe_dispatch=dispatch), params, TOKENS)
    np.testing.assert_allclose(np.asarray(out), reference, atol=1e-5, rtol=0)
    normal = ["--router-init", "normal"]
    assert cli.main(["upcycle", str(dense_dir), str(moe_yaml), str(tmp_path / "fine-normal"), *normal]) == 1


def test_bad_inputs_are_one_line_errors_and_write_nothing(upcycled, tmp_path, capsys):
    _, dense_dir, dense, _, _, _ = upcycled
    heads = dataclasses.replace(dense, model=dataclasses.replace(dense.model, n_experts=4, n_heads=8, head_dim=8))
    cases = [
        (_moe_config(tmp_path, dense, d_model=64)[0], "model.d_model is 32 in the source but 64"),
        (_moe_config(tmp_path, dense, d_ff=64)[0], "model.d_ff (64) must divide the dense d_ff (48)"),
        (_moe_config(tmp_path, dense, d_ff=16)[0], "multiples of 3"),
        (_moe_config(tmp_path, dense, d_ff=24)[0], "only with model.routed_scale=2"),
        (_write_config(tmp_path / "heads.yaml", heads), "model.n_heads is 4 in the source but 8"),
        (_moe_config(tmp_path, dense, vocab_size=128)[0], "model.vocab_size is 97 in the source but 128"),
        (_moe_config(tmp_path, dense, n_experts=0)[0], "the target config is dense"),
    ]
    for moe_yaml, message in cases:
        assert cli.main(["upcycle", str(dense_dir), str(moe_yaml), str(tmp_path / "x")]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
        assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    moe_yaml = _moe_config(tmp_path, dense)[0]
    assert cli.main(["upcycle", str(dense_dir), str(moe_yaml), str(tmp_path / "moe")]) == 0
    assert cli.main(["upcycle", str(tmp_path / "moe"), str(moe_yaml), str(tmp_path / "x")]) == 1
    assert "is already an MoE (4 experts)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
