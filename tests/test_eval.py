"""`moe eval` and `moe generate` from the command line: perplexity against transformers,
the passkey grid, sources, and one-line errors for bad input."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from moe import cli
from moe.convert import convert_from_hf
from moe.data import tokenizer as tokenizer_lib
from moe.infer import passkey
from moe.infer.commands import chat_ids
from moe.infer.perplexity import windows

from helpers import ROOT
from hf_models import stdlib_mixtral

TOKENIZER = ROOT / "experiments/tokenizer/stdlib-4k.model"
TEXTS = ["def add(a, b):\n    return a + b\n" * 6, "The pass key is 123. Remember it."]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A random Mixtral with the 4k stdlib tokenizer, as a HF folder and converted."""
    root = tmp_path_factory.mktemp("eval")
    stdlib_mixtral(root / "hf", TOKENIZER, seed=0, max_positions=200)
    convert_from_hf(root / "hf", root / "converted")
    for i, text in enumerate(TEXTS):
        (root / f"text{i}.txt").write_text(text)
    return root


def _hf_windowed_nll(hf_dir, ids, context, stride):
    """Reference: HF logits over the same windows, each target scored once (written apart from ours)."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    total, count, done, begin = 0.0, 0, 1, 0
    while done < len(ids):
        end = min(begin + context, len(ids))
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin:end]])).logits[0].double()
        logp = torch.log_softmax(logits, -1).numpy()
        for j in range(done, end):  # target ids[j] predicted at window index j - 1 - begin
            assert j - 1 - begin >= 0, "a target must have its predecessor in the window"
            total -= logp[j - 1 - begin, ids[j]]
            count += 1
        done, begin = end, min(begin + stride, end - 1, len(ids) - context)
    return total, count


def test_windows_score_every_target_exactly_once():
    for n, context, stride in [(5, 8, 4), (30, 8, 3), (30, 8, 8), (17, 16, 1), (40, 8, 8)]:
        ids = list(range(n))
        scored = []
        for w in windows(ids, context, stride):
            assert len(w.ids) <= context and w.score_from >= 0  # a window's first token is only an input
            start = ids.index(w.ids[0])
            scored += [start + j for j in range(w.score_from + 1, len(w.ids))]
        assert scored == list(range(1, n))


@pytest.mark.parametrize("stride", [12, None])  # None: the default, disjoint windows
def test_perplexity_equals_transformers(hf_model, capsys, terminal, stride):
    out = hf_model / f"ppl-{stride}"
    args = [
        "eval",
        str(hf_model / "converted"),
        "--perplexity",
        str(hf_model / "text0.txt"),
        str(hf_model / "text1.txt"),
    ]
    args += ["--context", "32", "--out", str(out)] + (["--stride", str(stride)] if stride else [])
    assert cli.main(args) == 0
    ours = json.loads((out / "perplexity.json").read_text())
    sp = tokenizer_lib.load(str(TOKENIZER))
    total, count = 0.0, 0
    for text in TEXTS:
        nll, n = _hf_windowed_nll(hf_model / "hf", [sp.bos_id(), *sp.encode(text)], 32, stride or 32)
        total, count = total + nll, count + n
    ids = [[sp.bos_id(), *sp.encode(text)] for text in TEXTS]
    assert ours["tokens"] == count == sum(len(i) - 1 for i in ids) and count > 64  # several windows; all scored
    assert abs(ours["perplexity"] / math.exp(total / count) - 1) <= 1e-4
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert ours["bits_per_byte"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-4)
    assert "perplexity" in capsys.readouterr().out
    assert "perplexity:   0%" in terminal.getvalue()  # its progress bar


def test_passkey_grid_writes_table_heatmap_and_records(hf_model, terminal):
    out = hf_model / "pk"
    args = [
        "eval",
        str(hf_model / "hf"),
        "--passkey",
        "--lengths",
        "100",
        "160",
        "--depths",
        "0",
        "1",
        "--trials",
        "2",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 0
    records = json.loads((out / "passkey.json").read_text())
    assert len(records) == 2 * 2 * 2 and all(r["prompt_tokens"] <= r["length"] for r in records)
    assert all(r["correct"] == (r["answer"] == str(r["key"])) for r in records)
    assert (out / "passkey.png").stat().st_size > 0 and "| 160 |" in (out / "passkey.md").read_text()
    assert "passkey lengths:   0%" in terminal.getvalue()


def test_passkey_prompt_puts_the_key_at_its_depth():
    sp = tokenizer_lib.load("mistral-v1")
    sizer = passkey.Sizer.of(sp)
    for n_tokens in (200, 1000):
        k = sizer.fillers_for(n_tokens)
        text = passkey.passkey_text(k, 0.25, 54321)
        assert n_tokens - sizer.per_filler < len(sp.encode(text)) + 1 <= n_tokens
        before = text.split(passkey.key_line(54321))[0]
        assert before.count(passkey.FILLER) == round(0.25 * k) and text.endswith(passkey.QUESTION)
    assert passkey.answer_of(" 54321. The") == "54321" and passkey.answer_of(" no") is None


def test_generate_writes_jsonl_for_a_prompt_file(hf_model):
    prompts = hf_model / "prompts.jsonl"
    prompts.write_text('{"prompt": "import os"}\n{"prompt": "class A:"}\n')
    out = hf_model / "gen" / "out.jsonl"
    args = [
        "generate",
        str(hf_model / "converted"),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--max-new-tokens",
        "5",
        "--temperature",
        "0.7",
        "--top-k",
        "40",
    ]
    assert cli.main(args) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["import os", "class A:"]
    assert all(r["finish_reason"] in ("eos", "length") and 1 <= len(r["tokens"]) <= 5 for r in lines)


def test_chat_uses_mistral_instruct_template():
    ids = chat_ids("Hello there", "mistral-v1")
    sp = tokenizer_lib.load("mistral-v1")
    assert ids[0] == 1 and sp.decode(ids) == "[INST] Hello there [/INST]"
    own = chat_ids("Hello there", "experiments/tokenizer/stdlib-4k.model")  # any model's own tokenizer
    assert tokenizer_lib.load("experiments/tokenizer/stdlib-4k.model").decode(own) == "[INST] Hello there [/INST]"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--max-new-tokens", "0", "--prompt", "x"], "--max-new-tokens must be >= 1"),
        (["--top-p", "1.5", "--temperature", "1", "--prompt", "x"], r"top-p must be in (0, 1]"),
        (["--prompt", "x" * 400, "--max-new-tokens", "4"], "exceeds model.max_seq_len"),
        (["--prompt", "x", "--top-k", "0", "--temperature", "1"], "top-k must be >= 1"),
        (["--prompt", "x", "--tokenizer", "mistral-v1"], "has a vocabulary of 32000 but model.vocab_size is 4096"),
        (["--prompts", "missing.jsonl", "--out", "OUT"], "cannot read --prompts"),
    ],
)
def test_bad_generate_input_is_one_line_and_writes_nothing(hf_model, capsys, extra, message):
    extra = [str(hf_model / "written.jsonl") if e == "OUT" else e for e in extra]
    assert cli.main(["generate", str(hf_model / "converted"), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (hf_model / "written.jsonl").exists()


def test_missing_or_unreadable_source_is_one_line(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "nowhere"), "--perplexity"]) == 1
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["generate", str(tmp_path / "empty"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert "holds no Orbax params checkpoint" in err and len(err.splitlines()) == 1
    np.testing.assert_equal(sorted(p.name for p in tmp_path.iterdir()), ["empty"])


@pytest.mark.slow
def test_no_libtpu_noise_on_a_host_without_tpus(hf_model):
    """The tpu extra is installed (CI too); without TPU chips, JAX must not start libtpu."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    run = subprocess.run(
        [sys.executable, "-m", "moe", "generate", str(hf_model / "hf"), "--prompt", "x", "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "TPU" not in run.stderr and "libtpu" not in run.stderr, run.stderr


def test_platform_choice_leaves_tpu_hosts_and_user_choices_alone(monkeypatch):
    from moe import platform

    monkeypatch.setattr(platform, "has_tpu", lambda: False)
    env = {}
    assert platform.quiet_without_tpu(env) in ("cpu", "cuda,cpu") and env["JAX_PLATFORMS"]
    assert platform.quiet_without_tpu({"JAX_PLATFORMS": "tpu"}) is None
    monkeypatch.setattr(platform, "has_tpu", lambda: True)
    assert platform.quiet_without_tpu({}) is None
