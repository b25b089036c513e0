"""Hugging Face conversion, with transformers (PyTorch, CPU) as the numerical reference."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moe.model as M
from moe.checkpoint.params import restore_params
from moe.convert import ConversionError, convert_from_hf, convert_to_hf, load_hf, save_hf

from helpers import ROOT
from hf_models import SEQ, VARIANTS, make_hf


def hf_logits(path, tokens):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def tokens_for(vocab=97, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(2, SEQ))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_to_ours_matches_transformers_logits(tmp_path, variant):
    hf_dir = make_hf(tmp_path, variant)
    cfg, params = load_hf(hf_dir)
    tokens = tokens_for()
    ours = np.asarray(M.logits(cfg, params, tokens))
    assert np.abs(ours - hf_logits(hf_dir, tokens)).max() <= 1e-4
    # the streaming converter writes a checkpoint that restores to the same params
    convert_from_hf(hf_dir, tmp_path / "ckpt")
    restored = restore_params(tmp_path / "ckpt" / "params")
    np.testing.assert_array_equal(np.asarray(M.logits(cfg, restored, tokens)), ours)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ours_to_hf_loads_in_transformers_with_same_logits(tmp_path, variant):
    cfg, params = load_hf(make_hf(tmp_path, variant, seed=1))
    save_hf(cfg, params, tmp_path / "out")
    tokens = tokens_for(seed=2)
    expected = np.asarray(M.logits(cfg, params, tokens))
    assert np.abs(hf_logits(tmp_path / "out", tokens) - expected).max() <= 1e-4
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [VARIANTS[variant][0].__name__]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exported_config_equals_transformers_own_field_by_field(tmp_path, variant):
    """Our config.json read by transformers against the config transformers wrote for the same
    model: every field equal (tie_word_embeddings, window, rope, eps, ids...), but the ones that
    describe training rather than the model, and head_dim written out where HF leaves it implied."""
    from transformers import AutoConfig

    hf_dir = make_hf(tmp_path, variant)
    cfg, params = load_hf(hf_dir)
    save_hf(cfg, params, tmp_path / "out")
    theirs = AutoConfig.from_pretrained(hf_dir).to_dict()
    ours = AutoConfig.from_pretrained(tmp_path / "out").to_dict()
    training_only = {"_name_or_path", "initializer_range", "router_aux_loss_coef"}
    if "moe_intermediate_size" in theirs:  # Qwen3-MoE: the dense MLP width, unused without dense layers
        training_only.add("intermediate_size")
    if theirs.get("head_dim") is None:
        assert ours["head_dim"] == theirs["hidden_size"] // theirs["num_attention_heads"]
        training_only.add("head_dim")
    assert set(ours) - training_only == set(theirs) - training_only
    assert {k: ours[k] for k in ours if k not in training_only} == {
        k: theirs[k] for k in theirs if k not in training_only
    }
    assert ours["tie_word_embeddings"] is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["mixtral", "mistral-head-dim", "qwen3-moe"])
def test_round_trip_is_bit_exact(tmp_path, variant, dtype):
    hf_dir = make_hf(tmp_path, variant, dtype=dtype)
    convert_from_hf(hf_dir, tmp_path / "ckpt")
    convert_to_hf(tmp_path / "ckpt", tmp_path / "back")
    before, after = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for name, tensor in before.items():
        assert after[name].dtype == dtype and after[name].shape == tensor.shape, name
        assert torch.equal(after[name].view(bits), tensor.view(bits)), name


def test_multi_shard_output_loads_in_transformers(tmp_path):
    hf_dir = make_hf(tmp_path, "mixtral", seed=3)
    convert_from_hf(hf_dir, tmp_path / "ckpt")
    convert_to_hf(tmp_path / "ckpt", tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    tokens = tokens_for(seed=4)
    np.testing.assert_allclose(hf_logits(tmp_path / "sharded", tokens), hf_logits(hf_dir, tokens), atol=1e-6)
    # and the sharded folder converts back in
    cfg, params = load_hf(tmp_path / "sharded")
    assert np.abs(np.asarray(M.logits(cfg, params, tokens)) - hf_logits(hf_dir, tokens)).max() <= 1e-4


def _edit_config(hf_dir, **changes):
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            dict(architectures=["LlamaForCausalLM"], model_type="llama"),
            "architecture 'LlamaForCausalLM' is not supported",
        ),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling=.* is not implemented"),
        (dict(rope_parameters={"rope_theta": 1e6, "rope_type": "yarn"}), "rope_type 'yarn' is not supported"),
        (dict(attention_bias=True), "attention_bias=True .* is not implemented"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings=True .* is not implemented"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(num_attention_heads=3), "invalid model: model.n_heads \\(3\\) must be divisible"),
        (dict(hidden_size=64), "expected shape \\(97, 64\\) from config.json, found \\(97, 32\\)"),
        (dict(vocab_size=None), "missing the field 'vocab_size'"),
    ],
)
def test_unsupported_or_inconsistent_configs_are_refused(tmp_path, changes, message):
    hf_dir = make_hf(tmp_path, "mixtral")
    _edit_config(hf_dir, **changes)
    with pytest.raises(ConversionError, match=message):
        load_hf(hf_dir)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(mlp_only_layers=[1]), "layers \\[1\\] have a dense MLP"),
        (dict(decoder_sparse_step=2), "layers \\[0\\] have a dense MLP"),
        (dict(use_sliding_window=True, sliding_window=4), "use_sliding_window=true .* is not implemented"),
    ],
)
def test_qwen3_moe_features_we_do_not_implement_are_refused(tmp_path, changes, message):
    hf_dir = make_hf(tmp_path, "qwen3-moe")
    _edit_config(hf_dir, **changes)
    with pytest.raises(ConversionError, match=message):
        load_hf(hf_dir)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(n_shared_experts=1), "n_shared_experts=1 has no place in Hugging Face's MixtralForCausalLM"),
        (dict(router_scores="sigmoid"), "router_scores='sigmoid' has no place"),
        (dict(norm_topk=False), "norm_topk=False has no place in Hugging Face's MixtralForCausalLM"),
        (dict(qk_norm=True, sliding_window=4), "sliding_window=4 has no place in Hugging Face's Qwen3MoeForCausalLM"),
        (dict(qk_norm=True, n_experts=0), "qk_norm on a dense model"),
    ],
)
def test_models_no_hugging_face_class_holds_are_refused_on_export(tmp_path, fields, message):
    from helpers import tiny_model

    cfg = tiny_model(**fields)
    params = jax.tree_util.tree_map(np.asarray, M.init(cfg, jax.random.key(0)))
    with pytest.raises(ConversionError, match=message):
        save_hf(cfg, params, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    hf_dir = make_hf(tmp_path, "mixtral")
    tensors = load_file(hf_dir / "model.safetensors")
    missing = dict(tensors)
    del missing["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(missing, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="missing .*layers.1.block_sparse_moe.experts.3.w2.weight"):
        load_hf(hf_dir)
    extra = dict(tensors, **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)})
    save_file(extra, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="unexpected tensors .*q_proj.bias"):
        load_hf(hf_dir)


def test_legacy_hub_config_loads(tmp_path):
    hf_dir = make_hf(tmp_path, "mixtral", dtype=torch.bfloat16)
    config = json.loads((hf_dir / "config.json").read_text())
    theta = config["rope_parameters"]["rope_theta"]
    _edit_config(hf_dir, rope_parameters=None, dtype=None, rope_theta=theta, torch_dtype="bfloat16")
    cfg, params = load_hf(hf_dir)
    assert cfg.rope_theta == theta and cfg.param_dtype == "bfloat16"
    tokens = tokens_for()
    np.testing.assert_allclose(np.asarray(M.logits(cfg, params, tokens)), hf_logits(hf_dir, tokens), atol=1e-4)


@pytest.mark.slow
def test_cli_convert_both_directions(tmp_path):
    hf_dir = make_hf(tmp_path, "mistral-window")
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "moe", "convert", *map(str, a)], capture_output=True, text=True, cwd=ROOT
    )
    r = run("from-hf", hf_dir, f"{tmp_path / 'ckpt'}/")  # `out/` and `out` alike
    assert r.returncode == 0, r.stderr
    r = run("to-hf", tmp_path / "ckpt", tmp_path / "bad", "--tokenizer", "mistral-v1")  # 32000 pieces, 97 rows
    assert r.returncode == 1 and "has a vocabulary of 32000 but the model's is 97" in r.stderr
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    r = run("to-hf", tmp_path / "ckpt", tmp_path / "out", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert "the export carries no tokenizer" in r.stderr and not (tmp_path / "out" / "tokenizer.model").exists()
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    r = run("from-hf", tmp_path / "nowhere", tmp_path / "x")
    assert r.returncode == 1 and "has no config.json" in r.stderr


def test_to_hf_takes_a_run_directory_and_an_out_ending_in_a_slash(tmp_path, capsys):
    """A run directory means its newest finished checkpoint, as for generate, eval and quantize."""
    from moe.cli import main

    cfg, params = load_hf(make_hf(tmp_path, "mixtral", seed=3))
    run = tmp_path / "run"
    for step in (2, 4):  # the newest is converted
        save_hf(cfg, jax.tree_util.tree_map(lambda a, s=step: a * (s / 4), params), tmp_path / f"hf{step}")
        convert_from_hf(tmp_path / f"hf{step}", run / "checkpoints" / str(step))
    (run / "checkpoints" / "6").mkdir()  # a save cut short: no params/_METADATA
    assert main(["convert", "to-hf", str(run), str(tmp_path / "out") + "/"]) == 0
    tokens = tokens_for(seed=4)
    assert np.abs(hf_logits(tmp_path / "out", tokens) - np.asarray(M.logits(cfg, params, tokens))).max() <= 1e-4
    assert main(["convert", "to-hf", str(tmp_path / "empty"), str(tmp_path / "x")]) == 1
    assert "checkpoints/<step>" in capsys.readouterr().err


def test_a_runs_export_carries_its_tokenizer_and_transformers_generates_our_text(tmp_path):
    """`moe convert to-hf RUN OUT` without --tokenizer exports the run's own (mistral-v1 here):
    AutoTokenizer on the folder adds BOS as we do, and transformers' greedy text is ours."""
    from transformers import AutoTokenizer

    from moe import config as config_lib
    from moe.checkpoint.params import save_params
    from moe.cli import main
    from moe.data import tokenizer as tokenizer_lib
    from moe.infer.decode import generate

    from helpers import tiny_model

    cfg = config_lib.Config(model=tiny_model(vocab_size=32000, n_experts=4), train=config_lib.TrainConfig(seq_len=32))
    params = M.init(cfg.model, jax.random.key(0))
    run = tmp_path / "run"
    save_params(run / "checkpoints" / "1" / "params", params)
    (run / "config.yaml").write_text(config_lib.dump(cfg))
    assert main(["convert", "to-hf", str(run), str(tmp_path / "out")]) == 0
    assert {"tokenizer.model", "tokenizer_config.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "out").iterdir()
    }
    prompt = "def main(args):\n    return"
    sp = tokenizer_lib.load("mistral-v1")
    ours_prompt = [sp.bos_id(), *sp.encode(prompt)]
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok(prompt)["input_ids"] == ours_prompt  # BOS first, then the same pieces
    ours = generate(cfg.model, params, [ours_prompt], 12)[0]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        theirs = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=12, do_sample=False)
    assert theirs[0, len(ours_prompt) :].tolist() == ours
    assert tok.decode(theirs[0, len(ours_prompt) :], skip_special_tokens=True) == sp.decode(ours)
