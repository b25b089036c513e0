"""moe serve's Prometheus metrics (prometheus-client), in a registry of the server's own."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "moe_requests", "HTTP requests to /v1/ by path and status", ["path", "status"], registry=registry
        )
        self.prompt_tokens = Counter("moe_prompt_tokens", "prompt tokens of finished requests", registry=registry)
        self.completion_tokens = Counter("moe_completion_tokens", "tokens generated", registry=registry)
        queue = Gauge("moe_queue_depth", "requests waiting for a decode row", registry=registry)
        queue.set_function(engine.waiting.qsize)
        rows = Gauge("moe_rows_in_use", "decode rows holding a request", registry=registry)
        rows.set_function(engine.rows_in_use)
        Gauge("moe_rows", "decode rows (--max-batch)", registry=registry).set(engine.rows)
        compiled = Gauge(
            "moe_compiled_programs", "programs the engine has compiled (constant after warm-up)", registry=registry
        )
        compiled.set_function(engine.compiles)
        generated = Gauge(
            "moe_generated_tokens", "tokens the engine produced, finished requests or not", registry=registry
        )
        generated.set_function(lambda: engine.generated)
        self.first_token = Histogram(
            "moe_time_to_first_token_seconds", "submission to first token", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.per_token = Histogram(
            "moe_time_per_output_token_seconds",
            "mean time between tokens after the first, per request",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def record(self, request) -> None:
        """A finished engine request's token counts and latencies."""
        self.prompt_tokens.inc(len(request.prompt))
        self.completion_tokens.inc(len(request.tokens))
        if request.first_token_at is not None:
            self.first_token.observe(request.first_token_at - request.submitted)
            if len(request.tokens) > 1 and request.finished_at is not None:
                self.per_token.observe((request.finished_at - request.first_token_at) / (len(request.tokens) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
