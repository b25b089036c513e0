"""lm-evaluation-harness on our models (`moe eval --tasks`): per-request log-likelihoods and
task metrics equal lm-eval's own Hugging Face backend on the same folder."""

import json

import pytest
from lm_eval import evaluator
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from moe import cli
from moe.convert.hf import convert_from_hf, convert_to_hf
from moe.data import tokenizer as tokenizer_lib
from moe.infer import source as source_lib
from moe.infer.harness import MoeLM

from helpers import ROOT
from hf_models import stdlib_mixtral

pytestmark = pytest.mark.slow  # two backends on two tasks: about a minute
TASKS = ROOT / "tests/data/lm_eval"
TOKENIZER = ROOT / "experiments/tokenizer/stdlib-4k.model"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    stdlib_mixtral(root / "random", TOKENIZER, seed=3, max_positions=64)
    convert_from_hf(root / "random", root / "converted")
    # the folder `moe convert to-hf` writes: its tokenizer files add bos as Mistral's does
    convert_to_hf(root / "converted", root / "hf", tokenizer=TOKENIZER)
    src = source_lib.load(root / "converted", "float32", str(TOKENIZER))
    ours = MoeLM(src.model, src.params, tokenizer_lib.load(str(TOKENIZER)), batch_size=4)
    theirs = HFLM(pretrained=str(root / "hf"), dtype="float32", batch_size=4, device="cpu")
    assert theirs.tok_encode("import os") == ours.tok_encode("import os")
    return root, ours, theirs


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_equal_the_hf_backend(models):
    _, ours, theirs = models
    pairs = [("def add(a, b):\n    return a +", " b"), ("import", " os"), ("", "hello world"), ("x = ", "[1, 2, 3]")]
    texts = ["def add(a, b):\n    return a + b\n" * 9, "The pass key is 123."]  # the first needs several windows
    for kind, args in [("loglikelihood", pairs), ("loglikelihood_rolling", [(t,) for t in texts])]:
        mine = getattr(ours, kind)(requests(kind, args))
        hf = getattr(theirs, kind)(requests(kind, args))
        for a, b in zip(mine, hf):
            a, b = (a, b) if kind == "loglikelihood_rolling" else (a[0], b[0])
            assert a == pytest.approx(b, abs=1e-4)
    assert [g for _, g in ours.loglikelihood(requests("loglikelihood", pairs))] == [
        g for _, g in theirs.loglikelihood(requests("loglikelihood", pairs))
    ]


def test_task_metrics_equal_the_hf_backend(models, monkeypatch):
    _, ours, theirs = models
    monkeypatch.chdir(TASKS)  # the tasks' data_files are relative
    manager = TaskManager(include_path=str(TASKS))
    tasks = ["pick_word", "finish_line"]
    mine = evaluator.simple_evaluate(model=ours, tasks=tasks, task_manager=manager)["results"]
    hf = evaluator.simple_evaluate(model=theirs, tasks=tasks, task_manager=manager)["results"]
    for task in tasks:
        for metric, value in hf[task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert mine[task][metric] == pytest.approx(value, abs=1e-6), (task, metric)


def test_moe_eval_tasks_writes_lm_evals_results(models, monkeypatch, capsys, tmp_path):
    root, _, _ = models
    monkeypatch.chdir(TASKS)
    args = [
        "eval",
        str(root / "converted"),
        "--tasks",
        "pick_word",
        "--include-path",
        str(TASKS),
        "--out",
        str(tmp_path),
    ]
    assert cli.main([*args, "--tokenizer", str(TOKENIZER)]) == 0
    results = json.loads((tmp_path / "lm_eval_results.json").read_text())["results"]["pick_word"]
    assert 0 <= results["acc,none"] <= 1 and "pick_word" in capsys.readouterr().out
    bad = ["eval", str(root / "converted"), "--tasks", "no_such_task", "--tokenizer", str(TOKENIZER)]
    assert cli.main(bad) == 1 and "unknown task" in capsys.readouterr().err


def test_local_completions_against_moe_serve_gives_the_same_metrics(models, monkeypatch):
    """lm-eval's own OpenAI-completions client (`local-completions`) scoring `moe serve`:
    echo + logprobs for the choices, stop strings for generation; the metrics are ours."""
    from helpers import start_server

    root, ours, _ = models
    monkeypatch.chdir(TASKS)
    manager = TaskManager(include_path=str(TASKS))
    tasks = ["pick_word", "finish_line"]
    process, url = start_server(root / "converted", "--tokenizer", str(TOKENIZER), "--max-batch", "4")
    try:
        model_args = {
            "base_url": f"{url}/v1/completions",
            "model": "converted",
            "tokenizer": str(root / "hf"),  # the folder `moe convert to-hf` writes: the same tokens as ours
            "tokenizer_backend": "huggingface",
            "add_bos_token": True,
            "max_length": 64,
            "num_concurrent": 4,
        }
        served = evaluator.simple_evaluate(
            model="local-completions", model_args=model_args, tasks=tasks, task_manager=manager
        )
    finally:
        process.kill()
    process.wait()
    mine = evaluator.simple_evaluate(model=ours, tasks=tasks, task_manager=manager)["results"]
    for task in tasks:
        for metric, value in mine[task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert served["results"][task][metric] == pytest.approx(value, abs=1e-6), (task, metric)
