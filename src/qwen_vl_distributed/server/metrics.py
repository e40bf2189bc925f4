"""Prometheus text-format metrics, written by hand (a few counters, one histogram and gauges need no library).

Counters and the histogram are updated on the event loop thread only; engine-side figures (queue depth, running
sequences, per-stage busy time) come from the engine thread's published snapshot at scrape time.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

from ..engine.async_engine import EngineStats
from ..engine.engine import CacheStats

PREFIX = "qwen_vl"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CHAT_PATH = "/v1/chat/completions"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: above every bound (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for bound, n in zip(self.buckets, self.counts):
            cum += n
            out.append(f'{name}_bucket{{le="{bound:g}"}} {cum}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self):
        self.requests: dict[str, int] = defaultdict(int)  # HTTP status of chat completion requests
        self.finished: dict[str, int] = defaultdict(int)  # finish_reason of generations
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)

    def request_done(self, status: int) -> None:
        self.requests[str(status)] += 1

    def generation_done(self, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                        cached_tokens: int = 0) -> None:
        self.finished[finish_reason] += 1
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens
        self.completion_tokens += completion_tokens

    def render(self, stats: EngineStats) -> str:
        p = PREFIX
        lines = [f"# HELP {p}_requests_total Chat completion requests by HTTP status.",
                 f"# TYPE {p}_requests_total counter"]
        lines += [f'{p}_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
        lines += [f"# HELP {p}_finished_total Generations by finish reason.", f"# TYPE {p}_finished_total counter"]
        lines += [f'{p}_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
        lines += _counter(f"{p}_prompt_tokens_total", "Prompt tokens of finished generations.", self.prompt_tokens)
        lines += _counter(f"{p}_prompt_tokens_cached_total",
                          "Prompt tokens taken from the prefix cache (earlier requests' KV blocks).",
                          self.cached_tokens)
        lines += _counter(f"{p}_completion_tokens_total", "Generated tokens.", self.completion_tokens)
        lines += [f"# HELP {p}_time_to_first_token_seconds From request arrival to the first generated token.",
                  f"# TYPE {p}_time_to_first_token_seconds histogram"]
        lines += self.ttft.lines(f"{p}_time_to_first_token_seconds")
        lines += [f"# HELP {p}_stage_busy_seconds_total Time each pipeline stage spent computing steps.",
                  f"# TYPE {p}_stage_busy_seconds_total counter"]
        lines += [f'{p}_stage_busy_seconds_total{{stage="{s["stage"]}"}} {s["busy_s"]:.6f}' for s in stats.stages]
        lines += [f"# HELP {p}_stage_steps_total Steps each pipeline stage has run.",
                  f"# TYPE {p}_stage_steps_total counter"]
        lines += [f'{p}_stage_steps_total{{stage="{s["stage"]}"}} {s["steps"]}' for s in stats.stages if "steps" in s]
        lines += _gauge(f"{p}_queue_depth", "Requests waiting for a place in the batch or for KV blocks.",
                        stats.waiting)
        lines += _gauge(f"{p}_running_sequences", "Sequences holding KV blocks.", stats.running)
        lines += _cache_lines(stats.cache)
        lines += _gauge(f"{p}_engine_alive", "1 while the engine thread is serving.", int(stats.alive))
        return "\n".join(lines) + "\n"


def _cache_lines(c: CacheStats) -> list[str]:
    """The KV pool and the prefix cache, from the engine's counters."""
    p = PREFIX
    lines = _gauge(f"{p}_kv_cache_usage", "Fraction of the KV cache's blocks held by sequences.",
                   c.blocks_used / c.blocks if c.blocks else 0.0)
    lines += _counter(f"{p}_prefix_cache_queries_total", "Tokens looked up in the prefix cache at admissions.",
                      c.prompt_tokens)
    lines += _counter(f"{p}_prefix_cache_hits_total", "Tokens found in the prefix cache at admissions.",
                      c.cached_tokens)
    lines += _gauge(f"{p}_prefix_cache_hit_rate", "Prefix cache hits over queries, in tokens, since start.",
                    c.cached_tokens / c.prompt_tokens if c.prompt_tokens else 0.0)
    lines += _counter(f"{p}_preemptions_total", "Sequences preempted (blocks freed, computed again later).",
                      c.preemptions)
    return lines


def _counter(name: str, help: str, value: int) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {value}"]


def _gauge(name: str, help: str, value: float) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {value}"]


class StatusRecorder:
    """Plain ASGI middleware: counts the status of every chat completion response (errors included).

    Pure ASGI rather than FastAPI's ``@app.middleware`` (BaseHTTPMiddleware), which wraps ``receive`` and can hide a
    client disconnect from the endpoint -- and noticing disconnects is how aborted requests free their slots."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != CHAT_PATH:
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
