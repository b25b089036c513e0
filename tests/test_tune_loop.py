"""Fine-tuning runs end to end: LoRA SFT on chat data from a checkpoint (adapters only in
the checkpoints, the base untouched, resume, merge, export), DPO raising the margin, and
`moe compare` counting."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import traverse_util

import moe.model as model_lib
from moe import cli
from moe import config as config_lib
from moe.checkpoint.params import restore_params, save_params
from moe.infer import source as source_lib
from moe.model.lora import is_adapter
from moe.training import loop

from helpers import tiny_model

pytestmark = pytest.mark.slow  # every test here runs `moe train` end to end

TOKENIZER = "experiments/tokenizer/stdlib-4k.model"


def _base(tmp_path):
    """A 'pretrained' checkpoint in the converted layout: params/ + config.yaml."""
    cfg = config_lib.Config(
        model=tiny_model(vocab_size=4096, max_seq_len=128), train=config_lib.TrainConfig(seq_len=64)
    )
    params = model_lib.init(cfg.model, jax.random.key(7))
    save_params(tmp_path / "base" / "params", params)
    (tmp_path / "base" / "config.yaml").write_text(config_lib.dump(cfg))
    return tmp_path / "base", cfg, params


def _rows(tmp_path, preference=False):
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    rows = []
    for i in range(24):
        word = words[i % 8] + str(i)
        if preference:
            rows.append({"prompt": f"Reverse {word}", "chosen": word[::-1], "rejected": word})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"Reverse {word}"},
                        {"role": "assistant", "content": word[::-1]},
                    ]
                }
            )
    path = tmp_path / ("pref.jsonl" if preference else "chat.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(base_dir, cfg, data, **sections):
    train = dict(
        steps=3,
        batch_size=8,
        seq_len=48,
        lr=1e-2,
        warmup_steps=0,
        eval_every=3,
        eval_batches=1,
        init_from=str(base_dir),
    )
    train.update(sections.pop("train", {}))
    return config_lib.from_dict(
        {
            "model": config_lib.to_dict(cfg)["model"],
            "train": train,
            "mesh": {"data": -1},
            "data": {
                "paths": [str(data)],
                "tokenizer": TOKENIZER,
                "workers": 0,
                "val_fraction": 0.2,
                "format": sections.pop("format", "chat"),
            },
            "checkpoint": {"every_steps": 3, "async_save": False},
            **sections,
        }
    )


def test_lora_run_trains_only_adapters_resumes_and_merges(tmp_path):
    base_dir, base_cfg, base_params = _base(tmp_path)
    lora = {"rank": 4, "alpha": 8.0, "targets": ["q", "v", "mlp", "gate"]}
    cfg = _cfg(base_dir, base_cfg, _rows(tmp_path), lora=lora)
    run = tmp_path / "run"
    loop.run(cfg, run, progress=False)
    saved = traverse_util.flatten_dict(restore_params(run / "checkpoints" / "3" / "params"))
    assert saved and all(is_adapter(p) for p in saved)  # no base weight, no optimizer state for one
    assert any(np.abs(v).max() > 0 for p, v in saved.items() if p[-1].endswith("_lora_b"))
    for a, b in zip(
        jax.tree_util.tree_leaves(restore_params(base_dir / "params")), jax.tree_util.tree_leaves(base_params)
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the base is bit-identical
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens_per_s"] > 0 for r in records if "loss" in r)

    loop.run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=5)), run, progress=False)
    assert "resumed from the checkpoint at step 3" in (run / "train.log").read_text()

    assert cli.main(["lora", "merge", str(run), str(tmp_path / "merged") + "/"]) == 0
    merged = source_lib.load(tmp_path / "merged")
    direct = source_lib.load(run)  # a LoRA run as an inference source: merged on load
    tokens = np.arange(1, 13)[None]
    ours = model_lib.apply(merged.model, merged.params, tokens)[0]
    np.testing.assert_allclose(
        np.asarray(ours), np.asarray(model_lib.apply(direct.model, direct.params, tokens)[0]), atol=1e-6
    )
    assert not np.allclose(
        np.asarray(ours), np.asarray(model_lib.apply(base_cfg.model, base_params, tokens)[0]), atol=1e-4
    )
    assert cli.main(["lora", "export", str(run), str(tmp_path / "adapter") + "/"]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_dpo_run_raises_the_reward_margin(tmp_path):
    base_dir, base_cfg, _ = _base(tmp_path)
    cfg = _cfg(
        base_dir,
        base_cfg,
        _rows(tmp_path, preference=True),
        format="preference",
        train={"objective": "dpo", "steps": 4, "lr": 3e-3},
        dpo={"beta": 0.5},
    )
    loop.run(cfg, tmp_path / "dpo", progress=False)
    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward_margin" in r]
    assert steps[0]["reward_margin"] == 0.0  # the policy starts as its reference
    assert steps[-1]["reward_margin"] > 0.05 and steps[-1]["reward_accuracy"] > 0.5


def test_compare_counts_wins_ties_and_losses(tmp_path, capsys):
    prompts = ["p1", "p2", "p3", "p4", "p5"]
    a = ["x", "y", "z", "w", "v"]
    b = ["x", "q", "z", "r", "v2"]
    refs = ["x", "y", "z!", "r", "v"]
    for name, answers, field in [("a", a, "completion"), ("b", b, "completion"), ("refs", refs, "answer")]:
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"prompt": p, field: x}) + "\n" for p, x in zip(prompts, answers))
        )
    out = tmp_path / "result.json"
    assert (
        cli.main(
            [
                "compare",
                str(tmp_path / "a.jsonl"),
                str(tmp_path / "b.jsonl"),
                "--judge",
                "exact",
                "--references",
                str(tmp_path / "refs.jsonl"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    # p1 both right (tie), p2 A right, p3 both wrong (tie), p4 B right, p5 A right
    assert (result["wins"], result["ties"], result["losses"]) == (2, 2, 1)
    assert result["win_rate"] == 2 / 3 and result["win_rate_ties_half"] == 3 / 5
    assert (result["accuracy_a"], result["accuracy_b"]) == (3 / 5, 2 / 5)
    assert "2 wins / 2 ties / 1 losses" in capsys.readouterr().out
    judge = tmp_path / "judge.py"
    judge.write_text(
        "import json, sys\nrow = json.load(sys.stdin)\nprint('B' if len(row['b']) > len(row['a']) "
        "else 'A' if len(row['a']) > len(row['b']) else 'tie')\n"
    )
    assert (
        cli.main(
            [
                "compare",
                str(tmp_path / "a.jsonl"),
                str(tmp_path / "b.jsonl"),
                "--judge",
                f"cmd:python {judge}",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (json.loads(out.read_text())["losses"], json.loads(out.read_text())["ties"]) == (1, 4)


def test_bad_chat_data_or_init_from_is_one_line_and_writes_nothing(tmp_path, capsys):
    base_dir, base_cfg, _ = _base(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        + "\n{oops\n"
    )
    config = tmp_path / "run.yaml"
    config.write_text(config_lib.dump(_cfg(base_dir, base_cfg, _rows(tmp_path))))
    for overrides, message in [
        ([f"data.paths=[{bad}]", f"data.val_paths=[{bad}]"], "bad.jsonl:2: not valid JSON"),
        (["model.n_experts=8"], "different architecture: model.n_experts is 4 there but 8 here; set model.n_experts=4"),
    ]:
        assert cli.main(["train", str(config), "--run-dir", str(tmp_path / "run"), *overrides]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert not (tmp_path / "run").exists()
