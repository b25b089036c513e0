"""`moe experts prune|merge` (moe/study/surgery.py): kept experts and router rows are the
source's bit for bit and in order, merged groups are usage-weighted averages of the experts
nearest their leader, a pruned model exports to a Mixtral transformers reads with our
logits, and bad inputs write nothing."""

import json

import jax
import numpy as np
import pytest
import torch

import moe.model as model_lib
from moe import cli
from moe import config as config_lib
from moe.checkpoint.params import restore_params, save_params
from moe.study import surgery

from helpers import tiny_model

TOKENIZER = "experiments/tokenizer/stdlib-4k.model"
DATA = ["--data", "json", "--docs", "4", "--doc-tokens", "40"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("surgery")
    cfg = config_lib.Config(
        model=tiny_model(vocab_size=4096, max_seq_len=64, n_experts=6, top_k=2),
        data=config_lib.DataConfig(tokenizer=TOKENIZER),
        train=config_lib.TrainConfig(seq_len=32),
    )
    params = jax.tree_util.tree_map(np.asarray, model_lib.init(cfg.model, jax.random.key(0)))
    save_params(tmp_path / "moe" / "params", params)
    (tmp_path / "moe" / "config.yaml").write_text(config_lib.dump(cfg))
    return tmp_path, cfg, params


def test_top_keeps_the_highest_scores_in_index_order_with_ties_to_the_lower_index():
    assert surgery.top(np.array([1.0, 5.0, 3.0, 5.0, 0.0]), 3) == [1, 2, 3]
    assert surgery.top(np.array([2.0, 2.0, 2.0]), 2) == [0, 1]


def test_groups_join_each_expert_to_its_most_similar_leader():
    logits = np.array([[1.0, 0.0, 0.9, 0.1], [0.0, 1.0, 0.1, 0.8], [1.0, 0.0, 1.0, 0.0]])  # [tokens, experts]
    assert surgery.groups(np.array([10.0, 9.0, 1.0, 2.0]), logits, 2) == {0: [0, 2], 1: [1, 3]}


def test_prune_keeps_the_most_weighted_experts_bit_for_bit_and_in_order(source):
    tmp_path, cfg, params = source
    out = tmp_path / "pruned"
    assert cli.main(["experts", "prune", str(tmp_path / "moe"), str(out), "--keep", "3", *DATA]) == 0
    record = json.loads((out / "surgery.json").read_text())
    pruned, moe = restore_params(out / "params"), params["layers"]["moe"]
    assert config_lib.load(out / "config.yaml").model.n_experts == 3
    for layer, entry in enumerate(record["layers"]):
        kept = entry["kept"]
        assert kept == sorted(kept) and len(kept) == 3 and 0 < entry["share_kept"] <= 1
        for name in ("w1", "w2", "w3"):
            assert np.asarray(pruned["layers"]["moe"][name][layer]).tobytes() == moe[name][layer][kept].tobytes()
        assert np.asarray(pruned["layers"]["moe"]["gate"][layer]).tobytes() == moe["gate"][layer][:, kept].tobytes()
    # the kept experts are the ones the source routed the most weight to, recomputed here
    stats = surgery.usage(cfg.model, params, _docs(cfg), 40)
    for entry, weight in zip(record["layers"], stats["weight"]):
        dropped = [e for e in range(6) if e not in entry["kept"]]
        assert weight[entry["kept"]].min() >= weight[dropped].max()
    assert np.asarray(pruned["layers"]["attn"]["q"]).tobytes() == params["layers"]["attn"]["q"].tobytes()


def _docs(cfg):
    from moe.data import tokenizer as tokenizer_lib
    from moe.study import routing

    files = routing.domains(["data=json"])["data"]
    return routing.encode(tokenizer_lib.load(TOKENIZER), files, 4, 40)


def test_merge_averages_each_group_by_usage_and_keeps_the_leaders_router_rows(source):
    tmp_path, cfg, params = source
    out = tmp_path / "merged"
    assert cli.main(["experts", "merge", str(tmp_path / "moe"), str(out), "--to", "2", *DATA]) == 0
    record = json.loads((out / "surgery.json").read_text())
    merged, moe = restore_params(out / "params"), params["layers"]["moe"]
    stats = surgery.usage(cfg.model, params, _docs(cfg), 40)
    for layer, entry in enumerate(record["layers"]):
        dropped = [e for e in range(6) if e not in entry["kept"]]
        assert stats["load"][layer][entry["kept"]].min() >= stats["load"][layer][dropped].max()
        members = [entry["merged"][str(leader)] for leader in entry["kept"]]
        assert sorted(e for group in members for e in group) == list(range(6))  # every expert in one group
        for slot, group in enumerate(members):
            share = stats["load"][layer][group] / stats["load"][layer][group].sum()
            want = np.einsum("e,e...->...", share, moe["w1"][layer][group].astype(np.float64))
            np.testing.assert_allclose(
                np.asarray(merged["layers"]["moe"]["w1"][layer][slot]), want, rtol=1e-6, atol=1e-7
            )
        assert (
            np.asarray(merged["layers"]["moe"]["gate"][layer]).tobytes()
            == moe["gate"][layer][:, entry["kept"]].tobytes()
        )


def test_a_pruned_mixtral_exports_to_transformers_with_our_logits(source):
    from transformers import AutoModelForCausalLM

    tmp_path, _, _ = source
    out = tmp_path / "pruned-hf-source"
    assert cli.main(["experts", "prune", str(tmp_path / "moe"), str(out), "--keep", "4", "--by", "load", *DATA]) == 0
    assert cli.main(["convert", "to-hf", str(out), str(tmp_path / "pruned-hf")]) == 0
    cfg, params = config_lib.load(out / "config.yaml").model, restore_params(out / "params")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    ours = np.asarray(model_lib.logits(cfg, params, tokens))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned-hf", dtype=torch.float32)
    assert hf.config.num_local_experts == 4
    with torch.no_grad():
        assert np.abs(hf(torch.tensor(tokens)).logits.numpy() - ours).max() <= 1e-4


@pytest.mark.parametrize(
    "args,message",
    [
        (["prune", "{src}", "{out}", "--keep", "6", *DATA], "fewer than the source's 6; got 6"),
        (["prune", "{src}", "{out}", "--keep", "1", *DATA], "at least model.top_k \\(2\\)"),
        (["merge", "{src}", "{out}", "--to", "3", "--data", "no/such/folder"], "no files there"),
        (["merge", "{dense}", "{out}", "--to", "3", *DATA], "is a dense model"),
    ],
)
def test_bad_inputs_are_one_line_errors_and_write_nothing(source, tmp_path, capsys, args, message):
    import re

    root, _, _ = source
    dense = tmp_path / "dense"
    dense_cfg = config_lib.Config(
        model=tiny_model(vocab_size=4096, n_experts=0),
        data=config_lib.DataConfig(tokenizer=TOKENIZER),
        train=config_lib.TrainConfig(seq_len=32),
    )
    save_params(dense / "params", model_lib.init(dense_cfg.model, jax.random.key(0)))
    (dense / "config.yaml").write_text(config_lib.dump(dense_cfg))
    out = tmp_path / "out"
    filled = [a.format(src=root / "moe", dense=dense, out=out) for a in args]
    assert cli.main(["experts", *filled]) == 1
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and "\n" not in err, err
    assert not out.exists() and not out.with_name("out.partial").exists()
