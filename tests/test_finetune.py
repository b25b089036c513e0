"""Fine-tuning: init_from against transformers, chat rendering and its loss mask, DPO, and
the bad inputs each refused in one line."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import config as config_lib
from moe.config import Config, ConfigError
from moe.data import chat
from moe.parallel import mesh as mesh_lib
from moe.training import dpo
from moe.training import step as train_lib
from moe.training.init_from import InitFromError

from hf_models import make_hf

V1 = "mistral-v1"


def _hf_config(path, **train) -> Config:
    from moe.convert.hf import read_hf_config

    model, _ = read_hf_config(path)
    return Config(
        model=model, train=config_lib.TrainConfig(init_from=str(path), **train), mesh=config_lib.MeshConfig(data=1)
    )


def _load(cfg):
    from moe.training.loop import _base_params

    return _base_params(cfg, mesh_lib.make_mesh(cfg, jax.devices()[:1]))


@pytest.mark.slow
def test_init_from_hf_gives_transformers_logits(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    import moe.model as model_lib

    hf_dir = make_hf(tmp_path, "mixtral")
    cfg = _hf_config(hf_dir)
    params = _load(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 12))
    ours = np.asarray(model_lib.apply(cfg.model, params, jnp.asarray(tokens))[0])
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(hf_dir)(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # the same weights through a converted (Orbax) checkpoint
    from moe.convert import convert_from_hf

    convert_from_hf(hf_dir, tmp_path / "converted")
    again = _load(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(tmp_path / "converted"))))
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_from_refuses_other_shapes_and_architectures(tmp_path):
    hf_dir = make_hf(tmp_path, "mixtral")
    cfg = _hf_config(hf_dir)
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_experts=8))
    with pytest.raises(InitFromError, match=r"different architecture: model.n_experts is 4 there but 8 here"):
        _load(other)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    lying = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_ff=40))
    with pytest.raises(
        InitFromError, match=r"tensor model.layers.0.block_sparse_moe.experts.0.w1.weight: expected shape"
    ):
        _load(lying)


CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six."},
]


def test_chat_rendering_is_mistral_commons_and_masks_only_answers():
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = chat.tokenizer_path(V1)
    ids, mask = chat.render(path, CONVERSATION)
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    reference = MistralTokenizer.from_file(path, mode=ValidationMode.finetuning).encode_chat_completion(
        ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in CONVERSATION])
    )
    assert ids.tolist() == reference.tokens
    sp = __import__("moe.data.tokenizer", fromlist=["load"]).load(V1)
    answers = [sp.decode([int(t) for t in ids[mask == 1] if t != sp.eos_id()])]
    assert answers == ["Four.Six."] or answers == ["Four. Six."], answers
    assert int(np.sum(ids[mask == 1] == sp.eos_id())) == 2  # each answer's eos is learned
    assert ids[0] == sp.bos_id() and mask[0] == 0


@pytest.mark.slow
def test_only_assistant_tokens_carry_loss():
    import moe.model as model_lib

    from helpers import tiny_model

    cfg = Config(model=tiny_model(vocab_size=32000, n_layers=1), train=config_lib.TrainConfig(seq_len=64))
    ids, mask = chat.render(chat.tokenizer_path(V1), CONVERSATION)
    ex = chat.example(ids, mask)
    n = len(ex["inputs"])
    batch = {
        "inputs": ex["inputs"][None],
        "targets": ex["targets"][None],
        "loss_mask": ex["loss_mask"][None],
        "segment_ids": np.ones((1, n), np.int32),
        "positions": np.arange(n)[None],
    }
    params = model_lib.init(cfg.model, jax.random.key(0))
    before = train_lib.loss_terms(cfg, params, batch)["ce_sum"]
    user = int(np.flatnonzero(ex["loss_mask"] == 0)[5])
    changed = dict(batch, targets=batch["targets"].copy())
    changed["targets"][0, user] = (changed["targets"][0, user] + 7) % 32000
    assert float(train_lib.loss_terms(cfg, params, changed)["ce_sum"]) == float(before)
    answer = int(np.flatnonzero(ex["loss_mask"] == 1)[0])
    changed["targets"][0, answer] = (changed["targets"][0, answer] + 7) % 32000
    assert float(train_lib.loss_terms(cfg, params, changed)["ce_sum"]) != float(before)


def test_dpo_loss_matches_the_formula_by_hand():
    policy_c, policy_r = jnp.array([-3.0, -2.0]), jnp.array([-4.0, -1.0])
    ref_c, ref_r = jnp.array([-3.5, -2.5]), jnp.array([-3.5, -1.5])
    loss, rc, rr = dpo.pair_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5, label_smoothing=0.1)
    # pair 0: z = 0.5 * ((-3 + 3.5) - (-4 + 3.5)) = 0.5; pair 1: z = 0.5 * (0.5 - 0.5) = 0
    sig = lambda z: 1 / (1 + np.exp(-z))
    expected = [-(0.9 * np.log(sig(0.5)) + 0.1 * np.log(sig(-0.5))), np.log(2.0)]
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rc - rr), [0.5, 0.0], rtol=1e-6)


def test_loss_mask_is_the_answer_tokens_and_their_eos_token_by_token():
    from moe.data import tokenizer as tokenizer_lib

    sp = tokenizer_lib.load(V1)
    ids, mask = chat.render(chat.tokenizer_path(V1), CONVERSATION)
    answers = [sp.encode(m["content"]) + [sp.eos_id()] for m in CONVERSATION if m["role"] == "assistant"]
    assert ids[mask == 1].tolist() == sum(answers, [])
    assert ids[-1] == sp.eos_id() and mask[-1] == 1
    starts = np.flatnonzero(np.diff(np.concatenate([[0], mask])) == 1)
    assert [sp.id_to_piece(int(ids[s - 1])) for s in starts] == ["]"] * 2  # each right after its [/INST]
    ex = chat.example(ids, mask)  # the mask follows the targets: position i learns ids[i + 1]
    assert ex["targets"][ex["loss_mask"] == 1].tolist() == sum(answers, [])
    last = chat.render(chat.tokenizer_path(V1), CONVERSATION, last_only=True)[1]
    assert ids[last == 1].tolist() == answers[-1]


def test_dpo_terms_put_policy_and_reference_where_the_formula_does(monkeypatch):
    """terms() on fixed logits (the model replaced) against the DPO formula computed by hand."""
    from helpers import tiny_model

    cfg = Config(model=tiny_model(vocab_size=7, n_experts=0))
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, objective="dpo"),
        dpo=config_lib.DPOConfig(beta=0.5, label_smoothing=0.1),
    )
    rng = np.random.default_rng(0)
    pairs, seq, vocab = 2, 5, 7
    batch = {
        "inputs": rng.integers(0, vocab, (pairs, 2, seq)),
        "targets": rng.integers(0, vocab, (pairs, 2, seq)),
        "loss_mask": np.array([[[0, 0, 1, 1, 1], [0, 0, 1, 1, 0]], [[0, 1, 1, 1, 1], [0, 1, 1, 0, 0]]]),
        "segment_ids": np.ones((pairs, 2, seq), np.int32),
        "positions": np.tile(np.arange(seq), (pairs, 2, 1)),
    }
    policy_logits = rng.normal(size=(2 * pairs, seq, vocab)).astype(np.float32)
    ref_logits = rng.normal(size=(2 * pairs, seq, vocab)).astype(np.float32)
    frozen = {"marker": "reference params"}
    seen = {}

    def fake_apply(model_cfg, params, *args, **kwargs):
        seen["reference params"] = params
        return jnp.asarray(ref_logits), {}

    monkeypatch.setattr(dpo, "forward", lambda *a, **k: (jnp.asarray(policy_logits), {}))
    monkeypatch.setattr(dpo.model_lib, "apply", fake_apply)
    terms = dpo.terms(cfg, {"policy": None}, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
    assert seen["reference params"] is frozen

    def logp(logits):  # [2 * pairs] sums of log p(target) over each row's mask, chosen and rejected alternating
        logits = logits.astype(np.float64)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        targets, mask = batch["targets"].reshape(-1, seq), batch["loss_mask"].reshape(-1, seq)
        return (np.take_along_axis(log_probs, targets[..., None], -1)[..., 0] * mask).sum(-1).reshape(pairs, 2)

    pol, ref = logp(policy_logits), logp(ref_logits)
    reward_c, reward_r = 0.5 * (pol[:, 0] - ref[:, 0]), 0.5 * (pol[:, 1] - ref[:, 1])
    z = reward_c - reward_r
    log_sig = lambda x: -np.log1p(np.exp(-x))
    loss = -0.9 * log_sig(z) - 0.1 * log_sig(-z)
    expected = {
        "loss_sum": loss.sum(),
        "dpo_loss": loss.sum(),
        "ce_sum": -pol[:, 0].sum(),
        "n_tokens": batch["loss_mask"][:, 0].sum(),
        "reward_margin": z.sum(),
        "reward_accuracy": (reward_c > reward_r).sum(),
        "logp_chosen": pol[:, 0].sum(),
        "logp_rejected": pol[:, 1].sum(),
    }
    assert set(terms) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(float(terms[name]), value, rtol=1e-5, err_msg=name)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"messages": CONVERSATION[1:3]}


@pytest.mark.parametrize(
    "row, message",
    [
        ("{not json", r"rows.jsonl:2: not valid JSON"),
        ({"messages": [CONVERSATION[2], CONVERSATION[1]]}, r"rows.jsonl:2: roles out of order at turn 0"),
        ({"messages": [CONVERSATION[1], {"role": "assistant", "content": " "}]}, r"rows.jsonl:2: empty assistant turn"),
        ({"prompt": "hi"}, r"rows.jsonl:2: a prompt row needs a 'completion'"),
    ],
)
def test_bad_chat_rows_name_their_line(tmp_path, row, message):
    from moe.data import pipeline as data_lib

    path = _write(tmp_path / "rows.jsonl", [GOOD, row, GOOD])
    cfg = Config(
        model=config_lib.ModelConfig(),
        data=config_lib.DataConfig(paths=(str(path),), format="chat", val_paths=(str(path),)),
    )
    with pytest.raises(chat.ChatDataError, match=message):
        data_lib.check(cfg)


def test_preference_row_without_rejected_is_refused(tmp_path):
    with pytest.raises(chat.ChatDataError, match="rows.jsonl:1: a preference row needs a non-empty 'rejected'"):
        chat.read_row(str(_write(tmp_path / "rows.jsonl", [{"prompt": "q", "chosen": "a"}])), 0, 1, "preference")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.rank=8", "lora.targets=[q, w4]", "train.init_from=x"], r"lora.targets\[1\] must be one of"),
        (["lora.rank=0", "train.init_from=x"], r"lora.rank must be >= 1"),
        (["lora.rank=8"], r"LoRA adapts pretrained weights: set train.init_from"),
        (["train.objective=dpo", "train.init_from=x"], r"train.objective=dpo and data.format=preference go together"),
        (["lora.rank=4", "lora.targets=[gate]", "lora.train_router=true", "train.init_from=x"], r"choose one"),
    ],
)
def test_bad_tuning_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.load(config_lib.Path(__file__).parents[1] / "configs" / "tiny-moe.yaml", overrides)


@pytest.mark.parametrize("targets", [("q", "k", "v", "o", "mlp", "gate"), ("v", "w1")])
@pytest.mark.slow
def test_exported_adapter_loads_into_peft_with_our_logits(tmp_path, targets):
    import torch
    from flax import traverse_util
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import moe.model as model_lib
    from moe.training.trainable import combine, split
    from moe.tune import peft_export

    hf_dir = make_hf(tmp_path, "mixtral")
    cfg = _hf_config(hf_dir)
    cfg = dataclasses.replace(cfg, lora=config_lib.LoRAConfig(rank=3, alpha=5.0, rslora=True, targets=targets))
    fresh = train_lib.fresh_params(cfg, jax.random.key(0))
    flat = traverse_util.flatten_dict(split(cfg, fresh)[0])
    for i, path in enumerate(sorted(flat)):  # trained adapters: B no longer zero
        if path[-1].endswith("_lora_b"):
            flat[path] = 0.2 * jax.random.normal(jax.random.key(i), flat[path].shape)
    adapters = traverse_util.unflatten_dict(flat)
    params = combine(cfg, adapters, _load(cfg))
    tokens = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (2, 12))
    ours = np.asarray(model_lib.apply(cfg.model, params, jnp.asarray(tokens), lora=cfg.lora)[0])
    plain = np.asarray(model_lib.apply(cfg.model, _load(cfg), jnp.asarray(tokens))[0])
    assert not np.allclose(ours, plain, atol=1e-3)
    out = peft_export.export(cfg, adapters, tmp_path / "adapter", base_model=str(hf_dir))
    with torch.no_grad():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), out)
        theirs = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_trainable_counts_of_lora_on_mixtral_8x7b(capsys):
    from moe import cli

    root = config_lib.Path(__file__).parents[1]
    assert (
        cli.main(
            [
                "params",
                str(root / "configs" / "mixtral-8x7b.yaml"),
                "lora.rank=16",
                "lora.targets=[q,k,v,o,mlp]",
                "train.init_from=x",
            ]
        )
        == 0
    )
    r, d, kv, f = 16, 4096, 1024, 14336  # per layer: q, k, v, o, then 8 experts x (w1, w3, w2)
    per_layer = r * (d + d) + 2 * r * (d + kv) + r * (d + d) + 8 * 3 * r * (d + f)
    out = capsys.readouterr().out
    assert f"trainable parameters: {32 * per_layer:,} (LoRA adapters {32 * per_layer:,})" in out
    assert "frozen (no gradients, no optimizer state): 46,702,792,704" in out
