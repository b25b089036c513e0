"""`moe bench --serve`: the continuous-batching engine under 1, 8 and 32 concurrent clients,
beside `moe.infer.generate` on the same requests one at a time and in static batches.

Each client is a thread that submits its next request when the previous one has finished
(closed loop), so the number of clients is the concurrency. Prompt and answer lengths are
drawn from a seeded generator; every request is greedy and runs to its length (eos is
ignored by asking the model for exactly that many tokens and counting what came back).
Reported: aggregate generated tokens/s, time to first token and inter-token latency (p50,
p99) from the engine's own timestamps; then 8 clients again with the requests taking the
base and two random rank-16 adapters (every weight) in turn: what serving adapters costs.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import jax
import numpy as np
from flax import traverse_util

from moe import config as config_lib
from moe import model as model_lib
from moe import progress
from moe.infer import generate
from moe.model.lora import TARGETS
from moe.serve import adapters as adapters_lib
from moe.serve.engine import Engine, Request

ADAPTER_RANK = 16  # two adapters of this rank on every weight in the mixed run


@dataclasses.dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    lengths: list[int]  # new tokens per request


def workload(vocab: int, n: int, seed: int, prompt_range=(16, 128), answer_range=(16, 64)) -> Workload:
    rng = np.random.default_rng(seed)
    prompts = [[1, *rng.integers(3, vocab, size=int(k) - 1).tolist()] for k in rng.integers(*prompt_range, size=n)]
    return Workload(prompts, [int(k) for k in rng.integers(*answer_range, size=n)])


def _percentiles(values: list[float]) -> dict:
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))} if values else {}


def random_adapter(name: str, params: dict, rank: int, seed: int) -> adapters_lib.Adapter:
    """An adapter of `rank` on every adaptable weight (attention, experts or MLP, router),
    with random A and B: what a trained one costs to serve."""
    rng, pairs = np.random.default_rng(seed), {}
    for path, w in traverse_util.flatten_dict(params).items():
        if path[0] != "layers" or path[-1] not in TARGETS:
            continue
        head, ins, outs = adapters_lib.weight_dims(path, tuple(w.shape))
        a = rng.normal(0, 1 / np.sqrt(np.prod(ins)), (*head, *ins, rank)).astype(np.float32)
        pairs[path] = (a, rng.normal(0, 0.01, (*head, rank, *outs)).astype(np.float32))
    return adapters_lib.Adapter(name, "random", pairs, rank)


def engine_run(engine: Engine, work: Workload, clients: int, adapters: tuple = (None,)) -> dict:
    """The workload through the engine from `clients` closed-loop clients; request i asks
    for adapters[i % len(adapters)] (None: the base)."""
    queue = list(range(len(work.prompts)))
    lock, finished = threading.Lock(), []

    def client():
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop(0)
            adapter = adapters[i % len(adapters)]
            request = engine.submit(Request(work.prompts[i], work.lengths[i], adapter=adapter))
            request.done.wait()
            with lock:
                finished.append(request)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(len(r.tokens) for r in finished)
    gaps = [(r.finished_at - r.first_token_at) / (len(r.tokens) - 1) for r in finished if len(r.tokens) > 1]
    return {
        "clients": clients,
        "adapters": [a for a in adapters if a is not None],
        "requests": len(finished),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "time_to_first_token_s": _percentiles([r.first_token_at - r.submitted for r in finished]),
        "inter_token_s": _percentiles(gaps),
    }


def generate_run(cfg, params, work: Workload, batch: int) -> dict:
    """The same requests through generate in static batches of `batch` (1: one at a time),
    timed on a second pass (the first compiles every shape). Every batch asks for the
    longest answer (one compiled loop), and only the requested tokens count."""
    longest = max(work.lengths)

    def one_pass() -> int:
        tokens = 0
        for first in range(0, len(work.prompts), batch):
            group = slice(first, first + batch)
            out = generate(cfg, params, work.prompts[group], longest, batch_size=batch)
            tokens += sum(min(len(o), n) for o, n in zip(out, work.lengths[group]))
        return tokens

    one_pass()
    start = time.perf_counter()
    tokens = one_pass()
    return {"batch": batch, "tokens": tokens, "tokens_per_s": tokens / (time.perf_counter() - start)}


def run(config: str = "tiny-moe", clients=(1, 8, 32), per_client: int = 4, seed: int = 0, overrides=(), **lengths):
    """lengths: prompt_range and answer_range for workload()."""
    cfg = config_lib.load(config, list(overrides)).model
    params = model_lib.init(cfg, jax.random.key(seed))
    rows = max(8, min(max(clients), 32))
    served = [random_adapter(name, params, ADAPTER_RANK, seed + i) for i, name in enumerate(("a", "b"))]
    engine = Engine(cfg, params, rows=rows, max_seq_len=min(cfg.max_seq_len, 256), adapters=served)
    engine.warm_up()  # every program compiled before the clock starts
    engine.start()
    result = {"config": config, "rows": rows, "device": jax.devices()[0].device_kind, "engine": []}
    try:
        for n in progress.bar(clients, desc="serve bench", unit="setting"):
            result["engine"].append(engine_run(engine, workload(cfg.vocab_size, n * per_client, seed, **lengths), n))
        mixed = workload(cfg.vocab_size, 8 * per_client, seed, **lengths)  # base, a, b in turn
        result["adapters"] = engine_run(engine, mixed, 8, (None, "a", "b"))
    finally:
        engine.stop()
    work = workload(cfg.vocab_size, 8 * per_client, seed, **lengths)
    result["generate"] = [generate_run(cfg, params, work, b) for b in (1, 8)]
    return result


def format_table(result: dict) -> str:
    lines = [f"serving {result['config']} on {result['device']}, {result['rows']} decode rows:"]
    for r in [*result["engine"], result["adapters"]]:
        ttft, itl = r["time_to_first_token_s"], r["inter_token_s"]
        first = f"first token p50 {ttft['p50'] * 1e3:.0f} ms, p99 {ttft['p99'] * 1e3:.0f} ms"
        between = f"between tokens p50 {itl['p50'] * 1e3:.1f} ms, p99 {itl['p99'] * 1e3:.1f} ms"
        mixed = f" (base, {', '.join(r['adapters'])} in turn)" if r.get("adapters") else ""
        lines.append(f"  {r['clients']:>2} clients{mixed}: {r['tokens_per_s']:8.1f} tokens/s; {first}; {between}")
    for g in result["generate"]:
        lines.append(f"  generate, static batches of {g['batch']}: {g['tokens_per_s']:8.1f} tokens/s")
    return "\n".join(lines)
