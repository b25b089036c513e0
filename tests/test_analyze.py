"""`moe analyze`: the repeat rates on hand-made routings, the per-token routing read from the
model, and an end-to-end run whose load fractions sum to 1 per domain and layer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe.model as model_lib
from moe import cli
from moe import config as config_lib
from moe.checkpoint.params import save_params
from moe.study import routing as analyze

from helpers import tiny_model

TOKENIZER = "experiments/tokenizer/stdlib-4k.model"


def test_repeat_rates_of_hand_made_routings():
    same = analyze.repeat_rates([np.array([[3, 1]] * 50)])
    assert same["first_same"] == 1.0 and same["topk_share"] == 1.0 and same["expected_first_same"] == 1.0
    alternating = analyze.repeat_rates([np.array([[0, 1], [2, 3]] * 25)])
    assert alternating["first_same"] == 0.0 and alternating["topk_share"] == 0.0
    assert alternating["expected_first_same"] == 0.5  # two first choices, half the tokens each
    assert alternating["expected_topk_share"] == 0.5  # {0,1} meets {0,1}, never {2,3}
    overlap = analyze.repeat_rates([np.array([[0, 1], [1, 2]] * 25)])
    assert overlap["first_same"] == 0.0 and overlap["topk_share"] == 1.0


def test_repeat_rates_of_independent_routing_meet_their_expectation():
    rng = np.random.default_rng(0)
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    docs = []
    for _ in range(40):
        first = rng.choice(4, size=500, p=probs)
        second = (first + 1 + rng.integers(0, 3, size=500)) % 4  # a different second choice
        docs.append(np.stack([first, second], axis=1))
    rates = analyze.repeat_rates(docs)
    assert rates["expected_first_same"] == pytest.approx(np.sum(probs**2), abs=0.01)
    assert rates["first_same"] == pytest.approx(rates["expected_first_same"], abs=0.01)
    assert rates["topk_share"] == pytest.approx(rates["expected_topk_share"], abs=0.01)


@pytest.mark.slow
def test_routing_reads_each_layers_top_k_and_first_choice_probability_from_the_model():
    cfg = tiny_model(n_layers=2)
    params = model_lib.init(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 7)), jnp.int32)
    idx, top1 = (np.asarray(a) for a in analyze.routing(cfg, params, tokens))
    assert idx.shape == (2, 2, 7, cfg.top_k) and top1.shape == (2, 2, 7)
    _, stats = model_lib.apply(cfg, params, tokens)
    counts = np.stack([np.bincount(idx[layer].reshape(-1), minlength=cfg.n_experts) for layer in range(2)])
    np.testing.assert_array_equal(counts, np.asarray(stats["expert_counts"]))  # the block's own top-k
    assert np.all(top1 >= 1 / cfg.n_experts) and np.all(top1 <= 1)
    # a router with zero weights has no preference: the first choice gets exactly 1 / n_experts
    # (the renormalized top-k weight would say 1 / top_k)
    flat = jax.tree.map(lambda a: a, params)
    flat["layers"]["moe"]["gate"] = jnp.zeros_like(params["layers"]["moe"]["gate"])
    _, top1_flat = analyze.routing(cfg, flat, tokens)
    np.testing.assert_allclose(np.asarray(top1_flat), 1 / cfg.n_experts, rtol=1e-6)


def _source(tmp_path):
    cfg = config_lib.Config(
        model=tiny_model(vocab_size=4096, max_seq_len=64),
        data=config_lib.DataConfig(tokenizer=TOKENIZER),
        train=config_lib.TrainConfig(seq_len=32),
    )
    save_params(tmp_path / "moe" / "params", model_lib.init(cfg.model, jax.random.key(0)))
    (tmp_path / "moe" / "config.yaml").write_text(config_lib.dump(cfg))
    return tmp_path / "moe"


def test_analyze_writes_loads_that_sum_to_one_and_refuses_an_empty_domain(tmp_path, capsys, terminal):
    source = _source(tmp_path)
    out = tmp_path / "analysis"
    assert (
        cli.main(
            [
                "analyze",
                str(source),
                "--data",
                "json=json",
                "email=email/mime",
                "--docs",
                "3",
                "--doc-tokens",
                "48",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "analysis.json").read_text())
    assert "routing documents:   0%" in terminal.getvalue()
    assert set(result["layers"]) == {"0", "1"}
    for per in result["layers"].values():
        for name in ("json", "email"):
            assert sum(per[name]["load"]) == pytest.approx(1.0) and per[name]["tokens"] > 0
            assert 1 / 8 <= per[name]["mean_top1_prob"] <= 1
    for name in ("analysis.md", "load_layer0.png", "load_layer1.png", "tokens.html", "tokens_layer1.png"):
        assert (out / name).is_file()
    assert cli.main(["analyze", str(source), "--data", "empty=no/such/package", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert "domain 'empty'" in err and "has no files" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
