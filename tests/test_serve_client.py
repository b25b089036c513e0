"""`moe serve` as a process on a free port, driven by the real openai client: outputs equal
generate's under concurrency, streaming, logprobs, errors, disconnects, load, SIGTERM."""

import concurrent.futures
import dataclasses
import signal
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest
from test_serve_adapters import ONE, TWO, save_run, trained
from test_serve_adapters import merged as merged_model

from moe import config as config_lib
from moe import model as M
from moe.checkpoint.params import save_params
from moe.data import tokenizer as tokenizer_lib
from moe.infer import generate
from moe.tune import peft_export

from helpers import ROOT, start_server, tiny_model

pytestmark = pytest.mark.slow
TOKENIZER = str(ROOT / "experiments/tokenizer/stdlib-4k.model")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = config_lib.Config(
        model=tiny_model(vocab_size=4096, max_seq_len=128, sliding_window=None),
        train=config_lib.TrainConfig(seq_len=64),
    )
    params = M.init(cfg.model, jax.random.key(5))
    root = tmp_path_factory.mktemp("serve")
    folder = root / "tiny"
    folder.mkdir()
    save_params(folder / "params", params)
    (folder / "config.yaml").write_text(config_lib.dump(cfg))
    merged, adapter_flags = {"tiny": params}, []
    for seed, (name, lora) in enumerate([("run", ONE), ("peft", TWO)]):  # a LoRA run, and one exported for peft
        _, adapters = trained(cfg.model, lora, seed)
        run = save_run(root / name, cfg.model, lora, adapters, init_from=str(folder))
        path = run if name == "run" else peft_export.export(dataclasses.replace(cfg, lora=lora), adapters, root / "pf")
        adapter_flags += ["--adapter", f"{name}={path}"]
        merged[name] = merged_model(params, adapters, lora)
    flags = ["--max-batch", "4", "--tokenizer", TOKENIZER, "--api-key", "k", "--grace-period", "20", *adapter_flags]
    process, url = start_server(folder, *flags)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=120)
    yield cfg.model, params, tokenizer_lib.load(TOKENIZER), client, url, process, merged
    if process.poll() is None:
        process.kill()


def metric(url, name: str) -> float:
    line = next(x for x in httpx.get(f"{url}/metrics").text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def compiled(url) -> float:
    return metric(url, "moe_compiled_programs")


def test_concurrent_requests_each_equal_generate_and_nothing_recompiles(server):
    cfg, params, sp, client, url, _, _ = server
    client.completions.create(model="tiny", prompt="warm up", max_tokens=2, temperature=0)
    before = compiled(url)
    rng = np.random.default_rng(0)
    prompts = [[1, *rng.integers(3, 4096, size=int(n)).tolist()] for n in rng.integers(1, 90, size=16)]
    lengths = [int(n) for n in rng.integers(1, 30, size=16)]

    def ask(i):
        r = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0)
        return r.choices[0].text, r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    longest = generate(
        cfg, params, prompts, max(lengths), batch_size=16
    )  # each row as alone; greedy: n tokens are a prefix
    for n, full, (text, used) in zip(lengths, longest, answers):
        expected = full[:n]
        assert text == sp.decode([t for t in expected if t != cfg.eos_id]) and used == len(expected)
    assert compiled(url) == before


def test_adapters_and_the_base_mixed_each_equal_their_merged_model(server):
    """A LoRA run and a PEFT folder served unmerged beside the base, requests of all three
    at once: each answer is its merged model's."""
    cfg, _, sp, client, _, _, merged = server
    assert [m.id for m in client.models.list().data] == ["tiny", "run", "peft"]
    rng = np.random.default_rng(1)
    prompts = [[1, *rng.integers(3, 4096, size=int(n)).tolist()] for n in rng.integers(1, 60, size=9)]
    names = ["tiny", "run", "peft"] * 3

    def ask(i):
        return client.completions.create(model=names[i], prompt=prompts[i], max_tokens=12, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(ask, range(9)))
    for prompt, name, answer in zip(prompts, names, answers):
        expected = generate(cfg, merged[name], [prompt], 12)[0]
        assert answer.model == name
        assert answer.choices[0].text == sp.decode([t for t in expected if t != cfg.eos_id]), name


def test_streams_chat_and_logprobs(server):
    cfg, params, sp, client, _, _, _ = server
    whole = client.completions.create(model="tiny", prompt="def parse(", max_tokens=16, temperature=0)
    stream = client.completions.create(model="tiny", prompt="def parse(", max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0
    )
    chunks = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    ids = [1, *sp.encode("for i in range(3): print(i)")]
    scored = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    logp = np.asarray(jax.nn.log_softmax(M.logits(cfg, params, np.asarray([ids]))[0]))
    np.testing.assert_allclose(
        scored.choices[0].logprobs.token_logprobs[1:], logp[np.arange(len(ids) - 1), ids[1:]], atol=1e-4
    )


def test_bad_input_gets_its_status_and_the_server_goes_on(server):
    _, _, _, client, url, _, _ = server
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=500)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", temperature=3)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_a_client_that_goes_away_mid_stream_frees_its_row(server):
    _, _, _, _, url, _, _ = server
    body = {"model": "tiny", "prompt": "x", "max_tokens": 120, "stream": True, "temperature": 0}
    before = metric(url, "moe_generated_tokens")
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer k"}) as r:
        next(r.iter_lines())
    for _ in range(100):
        if httpx.get(f"{url}/health").json()["rows_in_use"] == 0:
            break
        time.sleep(0.1)
    assert httpx.get(f"{url}/health").json()["rows_in_use"] == 0
    assert metric(url, "moe_generated_tokens") - before < 120  # stopped early, not run to its end


def test_200_requests_from_32_clients_none_lost_then_sigterm_drains(server):
    _, _, _, client, url, process, _ = server

    def ask(i):
        return client.completions.create(model="tiny", prompt=f"request {i}", max_tokens=3, seed=i).usage

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        usages = list(pool.map(ask, range(200)))
    assert len(usages) == 200 and all(0 < u.completion_tokens <= 3 for u in usages)
    late = {}
    thread = threading.Thread(
        target=lambda: late.update(r=client.completions.create(model="tiny", prompt="y", max_tokens=100, temperature=0))
    )
    thread.start()
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    thread.join(60)
    assert process.wait(timeout=60) == 0
    assert late["r"].usage.completion_tokens == 100  # the request in flight finished
