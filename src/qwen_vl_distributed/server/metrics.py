"""Prometheus metrics through prometheus_client, under vLLM's names (``vllm:...`` with a ``model_name`` label), so
dashboards and alerts written for a vLLM server work unchanged; what vLLM has no name for is ``qwen_vl_...``.

Request figures are recorded on the event loop thread as requests finish; engine-side figures (running and waiting
sequences, KV usage, prefix-cache queries and hits, preemptions, per-stage busy time) come from the engine thread's
published snapshot at scrape time. Every app has its own registry (several servers may live in one process, as in
the tests).
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..engine.async_engine import EngineStats
from ..engine.engine import CacheStats

API_PATHS = ("/v1/chat/completions", "/v1/completions")
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, model_name: str, stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        label, r = ["model_name"], self.registry

        def hist(name, doc, buckets):
            return Histogram(name, doc, label, buckets=buckets, registry=r).labels(model_name)

        self.ttft = hist("vllm:time_to_first_token_seconds", "From request arrival to the first token.",
                         LATENCY_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Between two tokens of a sequence.", LATENCY_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "From request arrival to its last token.",
                        LATENCY_BUCKETS)
        self.req_prompt = hist("vllm:request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.req_gen = hist("vllm:request_generation_tokens", "Generated tokens per sequence.", TOKEN_BUCKETS)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens.", label, registry=r).labels(model_name)
        self.gen_tokens = Counter("vllm:generation_tokens", "Generated tokens.", label, registry=r).labels(model_name)
        self.success = Counter("vllm:request_success", "Finished sequences by finish reason.",
                               label + ["finished_reason"], registry=r)
        self.http = Counter("qwen_vl_requests", "Completion requests by HTTP status.", ["status"], registry=r)
        # (its value is read at scrape time: ServerState points it at lifecycle.Admission.preparing)
        self.preprocessing = Gauge("qwen_vl_preprocessing_requests", "Requests admitted whose prompt is being built "
                                   "(or whose body is arriving), not yet queued.", registry=r)
        r.register(_EngineCollector(model_name, stats))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def request_done(self, status: int) -> None:
        self.http.labels(str(status)).inc()

    def generation_done(self, finish_reason: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        """A sequence ended; ``prompt_tokens`` is 0 for a request's second and later choices (counted once)."""
        self.success.labels(self.model_name, finish_reason).inc()
        self.gen_tokens.inc(completion_tokens)
        self.req_gen.observe(completion_tokens)
        self.e2e.observe(seconds)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
            self.req_prompt.observe(prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges and counters read from the engine thread's snapshot at scrape time."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]):
        self.model_name = model_name
        self.stats = stats

    def collect(self):
        s = self.stats()
        for name, doc, value in (("vllm:num_requests_running", "Sequences holding KV blocks.", s.running),
                                 ("vllm:num_requests_waiting", "Sequences waiting for a place in the batch or for "
                                                               "KV blocks.", s.waiting),
                                 ("vllm:kv_cache_usage_perc", "Fraction of the KV cache's blocks held by sequences "
                                                              "(0-1).", s.kv_usage)):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model_name], value)
            yield g
        yield from self._cache(s.cache)
        yield GaugeMetricFamily("qwen_vl_engine_alive", "1 while the engine thread is serving.", value=int(s.alive))
        busy = CounterMetricFamily("qwen_vl_stage_busy_seconds", "Time each pipeline stage spent computing steps.",
                                   labels=["stage"])
        steps = CounterMetricFamily("qwen_vl_stage_steps", "Steps each pipeline stage has run.", labels=["stage"])
        for st in s.stages:
            busy.add_metric([str(st["stage"])], st["busy_s"])
            if "steps" in st:
                steps.add_metric([str(st["stage"])], st["steps"])
        yield busy
        yield steps

    def _cache(self, c: CacheStats):
        """The prefix cache and preemptions, from the engine's counters (tokens looked up and found at every
        admission: a request's choices and a preempted sequence's recomputation count too)."""
        for name, doc, value in (
                ("vllm:prefix_cache_queries", "Tokens looked up in the prefix cache at admissions.", c.prompt_tokens),
                ("vllm:prefix_cache_hits", "Tokens found in the prefix cache at admissions.", c.cached_tokens),
                ("vllm:num_preemptions", "Sequences preempted (KV blocks freed, computed again later).",
                 c.preemptions)):
            m = CounterMetricFamily(name, doc, labels=["model_name"])
            m.add_metric([self.model_name], value)
            yield m
        yield GaugeMetricFamily("qwen_vl_prefix_cache_hit_rate", "Prefix cache hits over queries, in tokens, since "
                                "start.", value=c.cached_tokens / c.prompt_tokens if c.prompt_tokens else 0.0)


class StatusRecorder:
    """Plain ASGI middleware: counts the status of every completion response (errors included).

    Pure ASGI rather than FastAPI's ``@app.middleware`` (BaseHTTPMiddleware), which wraps ``receive`` and can hide a
    client disconnect from the endpoint -- and noticing disconnects is how aborted requests free their KV blocks."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in API_PATHS:
            return await self.app(scope, receive, send)

        started = False

        async def recording_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.request_done(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except Exception:
            if not started:  # the outer error middleware will answer 500
                self.metrics.request_done(500)
            raise
