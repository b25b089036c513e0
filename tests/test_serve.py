"""moe serve's HTTP API (FastAPI's TestClient, in process): OpenAI's shapes, outputs equal to
generate's, streaming, stop strings, logprobs, errors, metrics."""

import json
import os
import signal

import httpx
import jax
import numpy as np
import pytest
from fastapi.testclient import TestClient

from moe import config as config_lib
from moe import model as M
from moe.checkpoint.params import save_params
from moe.data import chat
from moe.data import tokenizer as tokenizer_lib
from moe.infer import generate
from moe.serve.app import create_app
from moe.serve.engine import Engine

from helpers import ROOT, start_server, tiny_model

TOKENIZER = str(ROOT / "experiments/tokenizer/stdlib-4k.model")


@pytest.fixture(scope="module")
def served():
    cfg = tiny_model(vocab_size=4096, max_seq_len=96, sliding_window=None)
    params = M.init(cfg, jax.random.key(2))
    sp = tokenizer_lib.load(TOKENIZER)
    engine = Engine(cfg, params, rows=3, max_seq_len=96)
    engine.start()
    with TestClient(create_app(engine, sp, TOKENIZER, "tiny", api_key="k")) as client:
        client.headers["Authorization"] = "Bearer k"
        yield cfg, params, sp, client
    engine.stop()


def test_completions_equal_generate_and_report_usage(served):
    cfg, params, sp, client = served
    texts = ["def parse(", "import os\n", "class A"]
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": texts, "max_tokens": 9, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [[sp.bos_id(), *sp.encode(t)] for t in texts]
    expected = generate(cfg, params, ids, 9)
    assert [c["text"] for c in body["choices"]] == [sp.decode([t for t in e if t != cfg.eos_id]) for e in expected]
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["usage"]["prompt_tokens"] == sum(map(len, ids))
    assert body["usage"]["completion_tokens"] == sum(map(len, expected))
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(served):
    cfg, params, sp, client = served
    ids = [sp.bos_id(), *sp.encode("for i in range(10):")]
    r = client.post(
        "/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2}
    )
    lp = r.json()["choices"][0]["logprobs"]
    logp = np.asarray(jax.nn.log_softmax(M.logits(cfg, params, np.asarray([ids]))[0]))
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    np.testing.assert_allclose(lp["token_logprobs"][1:], logp[np.arange(len(ids) - 1), ids[1:]], atol=2e-5)
    assert all(len(top) == 2 for top in lp["top_logprobs"][1:])


def test_a_stream_sends_the_same_text_in_pieces_then_done(served):
    _, _, _, client = served
    request = {"model": "tiny", "prompt": "def parse(", "max_tokens": 12, "temperature": 0}
    whole = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop") and len(chunks) > 2


def test_a_stop_string_ends_the_text_before_it(served):
    _, _, _, client = served
    request = {"model": "tiny", "prompt": "def parse(", "max_tokens": 20, "temperature": 0}
    whole = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    stop = whole[5:7]
    cut = client.post("/v1/completions", json={**request, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == whole[: whole.index(stop)] and cut["finish_reason"] == "stop"


def test_chat_renders_the_instruct_template(served):
    cfg, params, sp, client = served
    messages = [{"role": "user", "content": "Write a loop"}]
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": messages,
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 3,
        },
    )
    choice = r.json()["choices"][0]
    ids = chat.encode_prompt(chat.tokenizer_path(TOKENIZER), messages)
    expected = generate(cfg, params, [ids], 6)[0]
    assert choice["message"]["content"] == sp.decode([t for t in expected if t != cfg.eos_id])
    assert len(choice["logprobs"]["content"]) == len(expected)
    assert all(len(t["top_logprobs"]) == 3 for t in choice["logprobs"]["content"])


@pytest.mark.parametrize(
    "path, body, headers, status, param",
    [
        ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, None, 400, "temperature"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 21}, None, 400, "logprobs"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 95}, None, 400, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": [1, 5000]}, None, 400, "prompt"),
        ("/v1/completions", {"model": "big", "prompt": "x"}, None, 404, None),
        ("/v1/completions", {"model": "tiny", "prompt": "x"}, {"Authorization": "Bearer no"}, 401, None),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, None, 400, "messages"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(served, path, body, headers, status, param):
    _, _, _, client = served
    r = client.post(path, json=body, headers=headers or {})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    if body.get("max_tokens") == 95:  # OpenAI's code for a request beyond the context
        assert error["code"] == "context_length_exceeded"
    ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


class _Loop:
    def call_soon_threadsafe(self, fn, *args):
        pass


def test_text_grown_a_token_at_a_time_equals_decoding_the_whole_answer():
    """Choice decodes only the newest tokens; across spaces, line breaks and characters
    spelled in several byte tokens its text and pieces are the whole answer's decoding."""
    from moe.serve.app import Choice

    sp = tokenizer_lib.load(TOKENIZER)
    bytes_ = [sp.piece_to_id(f"<0x{b:02X}>") for b in "é€😀".encode()]
    rng = np.random.default_rng(0)
    for trial in range(20):
        tokens = rng.integers(3, sp.get_piece_size(), size=40).tolist()
        at = int(rng.integers(0, 40))
        tokens[at:at] = bytes_[: 2 + 7 * (trial % 2)]  # trials end or break inside a character too
        choice, request = Choice(sp, [1], []), type("R", (), {"tokens": []})()
        for token in tokens:
            request.tokens.append(token)
            choice.on_token(_Loop(), request, token, 0.0, None, None)
        choice.on_done(_Loop(), request)
        assert choice.text == sp.decode(tokens) and "".join(choice.pieces) == choice.text
        assert len(choice.pieces) == len(tokens)


def test_metrics_count_requests_tokens_and_latency(served):
    _, _, _, client = served
    client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3, "temperature": 0})
    text = client.get("/metrics").text
    assert 'moe_requests_total{path="/v1/completions",status="200"}' in text
    assert "moe_completion_tokens_total" in text and "moe_time_to_first_token_seconds_count" in text
    assert "moe_rows_in_use" in text and "moe_queue_depth" in text


@pytest.mark.slow
def test_moe_serve_answers_then_exits_0_on_sigterm(tmp_path):
    model = tiny_model(vocab_size=4096, max_seq_len=96, sliding_window=None)
    cfg = config_lib.Config(model=model, train=config_lib.TrainConfig(seq_len=64))
    run = tmp_path / "model"
    run.mkdir()
    save_params(run / "params", M.init(cfg.model, jax.random.key(0)))
    (run / "config.yaml").write_text(config_lib.dump(cfg))
    server, url = start_server(run, "--tokenizer", TOKENIZER)
    try:
        r = httpx.post(f"{url}/v1/completions", json={"model": "model", "prompt": "x", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGKILL)
