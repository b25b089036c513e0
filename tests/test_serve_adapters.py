"""LoRA adapters served unmerged: rows of different adapters and of the base in one step,
each equal to its merged model; LoRA runs, PEFT folders (peft's own and both transformers
layouts) and quantized bases."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from test_lora import lora_params
from test_serve_engine import run_all

from moe import config as config_lib
from moe import model as M
from moe.checkpoint.params import save_params
from moe.config import LoRAConfig
from moe.infer import generate
from moe.model import lora as lora_lib
from moe.model.transformer import Transformer
from moe.quant.params import quantize_params
from moe.serve import adapters as adapters_lib
from moe.serve.engine import Engine, EngineError, Request

from helpers import tiny_model

ONE = LoRAConfig(rank=4, alpha=8.0, targets=("q", "v", "mlp", "gate"))
TWO = LoRAConfig(rank=2, alpha=3.0, rslora=True, targets=("k", "o", "w2"))


def split(params):
    flat = traverse_util.flatten_dict(params)
    pick = lambda adapter: traverse_util.unflatten_dict(  # noqa: E731
        {p: v for p, v in flat.items() if lora_lib.is_adapter(p) == adapter}
    )
    return pick(False), pick(True)


def trained(cfg, lora, seed):
    """(base, adapters): a random base and adapters whose B has trained."""
    return split(lora_params(cfg, lora, seed=seed))


def save_run(path, model, lora, adapters, init_from="base", quant=None):
    cfg = config_lib.Config(
        model=model,
        lora=lora,
        quant=config_lib.QuantConfig(base=quant),
        train=config_lib.TrainConfig(seq_len=32, init_from=init_from),
    )
    save_params(path / "checkpoints" / "1" / "params", adapters)
    (path / "config.yaml").write_text(config_lib.dump(cfg))
    return path


def merged(base, adapters, lora):
    flat = {**traverse_util.flatten_dict(base), **traverse_util.flatten_dict(adapters)}
    return lora_lib.merge(traverse_util.unflatten_dict(flat), lora)


@pytest.fixture(scope="module", params=["moe", "dense"])
def served(request, tmp_path_factory):
    """A base, two LoRA runs over it, and each merged."""
    n_experts = 4 if request.param == "moe" else 0
    cfg = tiny_model(n_experts=n_experts, top_k=2 if n_experts else 0, max_seq_len=96)
    one = ONE if n_experts else dataclasses.replace(ONE, targets=("q", "v", "mlp"))
    base, first = trained(cfg, one, seed=0)
    _, second = trained(cfg, TWO, seed=4)
    tmp = tmp_path_factory.mktemp("adapters")
    runs = {"one": save_run(tmp / "one", cfg, one, first), "two": save_run(tmp / "two", cfg, TWO, second)}
    loaded = [adapters_lib.load(name, path, cfg, base) for name, path in runs.items()]
    return cfg, base, loaded, {"one": merged(base, first, one), "two": merged(base, second, TWO), None: base}


def test_bank_rows_equal_their_merged_models_in_every_dispatch_path(served):
    cfg, base, loaded, models = served
    bank = adapters_lib.bank(base, loaded, "float32")
    names = ["one", None, "two"]
    tokens = jax.random.randint(jax.random.key(3), (3, 9), 0, cfg.vocab_size)
    expected = np.concatenate([M.apply(cfg, models[n], tokens[i : i + 1])[0] for i, n in enumerate(names)])
    for dispatch in ("grouped", "dense", "sorted", "gather") if cfg.is_moe else ("grouped",):
        model = Transformer(dataclasses.replace(cfg, moe_dispatch=dispatch), lora=bank.lora)
        out, _ = model.apply({"params": bank.params}, tokens, adapter_select=jnp.asarray(bank.select(names)))
        np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, err_msg=dispatch)


def test_adapters_on_shared_experts_serve_as_their_merged_model(tmp_path):
    cfg = tiny_model(n_experts=4, top_k=2, n_shared_experts=1, d_ff_shared=16, max_seq_len=96)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("shared", "w1"))
    base, adapters = trained(cfg, lora, seed=5)
    loaded = [adapters_lib.load("s", save_run(tmp_path / "s", cfg, lora, adapters), cfg, base)]
    bank = adapters_lib.bank(base, loaded, "float32")
    tokens = jax.random.randint(jax.random.key(6), (2, 9), 0, cfg.vocab_size)
    expected = np.concatenate(
        [M.apply(cfg, merged(base, adapters, lora), tokens[:1])[0], M.apply(cfg, base, tokens[1:])[0]]
    )
    out, _ = Transformer(cfg, lora=bank.lora).apply(
        {"params": bank.params}, tokens, adapter_select=jnp.asarray(bank.select(["s", None]))
    )
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_two_adapters_and_the_base_in_one_batch_each_equal_their_merged_model(served):
    cfg, base, loaded, models = served
    rng = np.random.default_rng(0)
    prompts = [[1, *rng.integers(2, 97, size=n).tolist()] for n in (5, 70, 12, 3, 40, 9)]
    names = ["one", None, "two", "two", "one", None]
    engine = Engine(cfg, base, rows=3, max_seq_len=96, adapters=loaded)
    requests = [Request(p, max_tokens=10, adapter=n) for p, n in zip(prompts, names)]
    served_tokens = run_all(engine, requests)
    for tokens, prompt, name in zip(served_tokens, prompts, names):
        assert tokens == generate(cfg, models[name], [prompt], 10)[0], name
    compiled = engine.compiles()  # base-only and mixed steps both compiled by now
    run_all(engine, [Request(p, max_tokens=4, adapter=n) for p, n in zip(prompts[::-1], names)])
    assert engine.compiles() == compiled
    with pytest.raises(EngineError, match="no adapter named 'three'"):
        engine.submit(Request([1, 2], max_tokens=1, adapter="three"))


def test_a_quantized_base_serves_adapters_as_its_dequantized_merge(served):
    """QLoRA: the base stays 4-bit, the adapter rows equal the adapter merged into the
    dequantized base (what `moe lora merge` writes for a QLoRA run)."""
    cfg, base, loaded, _ = served
    quantized = quantize_params(base, "nf4")
    dequantized = jax.tree_util.tree_map(
        lambda w: w.dequantize() if hasattr(w, "dequantize") else w,
        quantized,
        is_leaf=lambda w: hasattr(w, "dequantize"),
    )
    one = loaded[0]
    prompts = [[1, 5, 9, 33, 2], [1, 70, 3]]
    engine = Engine(cfg, quantized, rows=2, max_seq_len=96, adapters=[one])
    got = run_all(engine, [Request(p, max_tokens=8, adapter="one") for p in prompts])
    bank = adapters_lib.bank(dequantized, [one], "float32")
    ref = lora_lib.merge(bank.params, bank.lora)
    assert got == generate(cfg, ref, prompts, 8, batch_size=2)
    assert ref is not None and not np.array_equal(
        np.asarray(traverse_util.flatten_dict(ref)[("layers", "attn", "q")]),
        np.asarray(traverse_util.flatten_dict(dequantized)[("layers", "attn", "q")]),
    )


def test_bad_adapters_are_refused_with_the_fix(served, tmp_path):
    cfg, base, _, _ = served
    with pytest.raises(adapters_lib.AdapterError, match="no such directory"):
        adapters_lib.load("x", tmp_path / "missing", cfg, base)
    plain = tmp_path / "plain"
    save_run(plain, cfg, LoRAConfig(), base)
    with pytest.raises(adapters_lib.AdapterError, match="not a LoRA run"):
        adapters_lib.load("x", plain, cfg, base)
    other = tiny_model(n_experts=cfg.n_experts, top_k=cfg.top_k, d_model=48, max_seq_len=96)
    _, wide = trained(other, TWO, seed=1)
    with pytest.raises(adapters_lib.AdapterError, match="the served weight is"):
        adapters_lib.load("x", save_run(tmp_path / "wide", other, TWO, wide), cfg, base)
    if cfg.is_moe:
        router = dataclasses.replace(TWO, train_router=True)
        with pytest.raises(adapters_lib.AdapterError, match="whole router"):
            adapters_lib.load("x", save_run(tmp_path / "router", cfg, router, wide), cfg, base)


def _prompt_logprobs(engine, prompt, adapter):
    request = Request(prompt, max_tokens=0, prompt_logprobs=True, adapter=adapter)
    run_all(engine, [request])
    return np.asarray([s[0] for s in request.prompt_scores])


@pytest.mark.slow
def test_an_adapter_trained_with_peft_on_hf_mixtral_serves_peft_s_logprobs(tmp_path):
    """peft's own folder (fused experts, router, attention with a rank_pattern): the
    served adapter's prompt log-probabilities equal PeftModel's, the base rows the base's."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from moe.convert.hf import load_hf

    from hf_models import make_hf

    hf_dir = make_hf(tmp_path, "mixtral")
    torch.manual_seed(0)
    peft_config = PeftLoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["q_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"],
        rank_pattern={"o_proj": 2},
        init_lora_weights=False,  # random B: an adapter that has trained
    )
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir), peft_config)
    peft_model.save_pretrained(tmp_path / "peft")
    model, params = load_hf(hf_dir)
    adapter = adapters_lib.load("peft", tmp_path / "peft", model, params)
    engine = Engine(model, params, rows=2, max_seq_len=64, adapters=[adapter])
    prompt = np.random.default_rng(2).integers(0, model.vocab_size, 20).tolist()
    with torch.no_grad():
        logits = peft_model(torch.tensor([prompt])).logits[0]
        theirs = torch.log_softmax(logits, -1).numpy()[np.arange(19), prompt[1:]]
        with peft_model.disable_adapter():
            base = torch.log_softmax(peft_model(torch.tensor([prompt])).logits[0], -1).numpy()[
                np.arange(19), prompt[1:]
            ]
    assert not np.allclose(theirs, base, atol=1e-2)
    np.testing.assert_allclose(_prompt_logprobs(engine, prompt, "peft"), theirs, atol=1e-4)
    np.testing.assert_allclose(_prompt_logprobs(engine, prompt, None), base, atol=1e-4)


def test_transformers_4_per_expert_modules_read_as_the_fused_layout(tmp_path):
    """The same adapter written both ways (transformers 5's fused experts, as `moe lora
    export` writes it, and transformers 4's block_sparse_moe.experts.E.w1 modules) reads to
    the same weight deltas A B."""
    import json

    from safetensors.numpy import load_file, save_file

    from moe.tune import peft_export, peft_import

    cfg = tiny_model(n_experts=4, top_k=2)
    _, adapters = trained(cfg, dataclasses.replace(ONE, targets=("q", "mlp")), seed=2)
    run_cfg = config_lib.Config(model=cfg, lora=dataclasses.replace(ONE, targets=("q", "mlp")))
    fused = peft_export.export(run_cfg, adapters, tmp_path / "fused")
    tensors, old = load_file(str(fused / "adapter_model.safetensors")), {}
    e, f = cfg.n_experts, cfg.d_ff
    for key, value in tensors.items():
        if ".mlp.experts" not in key:
            old[key] = value
        elif key.endswith("lora_A.weight"):
            layer = key.split(".layers.")[1].split(".")[0]
            prefix = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts"
            gate_up = ".base_layer." in key
            a = value.reshape(e, -1, value.shape[-1])  # [E, R, in]
            b = tensors[key.replace("lora_A", "lora_B")]
            b = b.reshape(b.shape[0], -1, e)  # [out, R, E]
            for x in range(e):
                blocks = {"w1": b[:f, :, x], "w3": b[f:, :, x]} if gate_up else {"w2": b[:, :, x]}
                for name, b_x in blocks.items():
                    old[f"{prefix}.{x}.{name}.lora_A.weight"] = np.ascontiguousarray(a[x])
                    old[f"{prefix}.{x}.{name}.lora_B.weight"] = np.ascontiguousarray(b_x)
    (tmp_path / "old").mkdir()
    save_file(old, str(tmp_path / "old" / "adapter_model.safetensors"))
    config = json.loads((fused / "adapter_config.json").read_text())
    widths = {name: 2 * ONE.rank for name in ("w1", "w3")}  # w1 and w3 keep gate_up's shared A, of rank 2r
    old_config = {**config, "rank_pattern": widths, "alpha_pattern": widths}
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(old_config))
    delta = lambda pairs: {k: np.einsum("l...ir,l...ro->l...io", *v) for k, v in pairs.items()}  # noqa: E731
    want, got = delta(peft_import.read(fused, cfg)), delta(peft_import.read(tmp_path / "old", cfg))
    assert sorted(want) == sorted(got) == [("layers", "attn", "q"), *(("layers", "moe", w) for w in ("w1", "w2", "w3"))]
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6, err_msg=str(key))
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps({**old_config, "use_dora": True}))
    with pytest.raises(peft_import.PeftError, match="DoRA"):
        peft_import.read(tmp_path / "old", cfg)
