"""Load for ``qwen-vl bench-serve``: request sets, Poisson arrivals against an OpenAI-compatible server, and the
serving figures (request and token throughput, TTFT, TPOT, ITL) of each arrival rate.

Every request streams (``stream_options.include_usage``), so the client sees each token as it comes: TTFT is from
sending the request to its first delta, ITL the gaps between deltas, TPOT (end - first delta) / (output tokens - 1)
per request; token counts come from the server's usage. Prompts are made of common English words; a calibration
request measures how many tokens a word is on this server (and what the chat template adds), so prompt lengths
are asked for in tokens.

Request sets: ``random`` (every prompt its own words), ``shared-prefix`` (every prompt starts with the same
``prefix_len`` tokens, then its own): with ``images`` per request, random images of ``image_size`` pixels --
each request's own in ``random``, the same ones inside the shared prefix in ``shared-prefix``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field

WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point home "
    "water room mother area money story fact month lot right study book eye job word business issue side kind "
    "head house service friend father power hour game line end member law car city community name president team "
    "minute idea kid body information back parent face others level office door health person art war history "
    "party result change morning reason research girl guy moment air teacher force education foot boy age policy "
    "music market sense nation plan college interest death experience effect use class control care field "
    "development role effort rate heart drug show leader light voice wife police mind price report decision son "
    "view relationship town road arm difference value building action model season society tax director position "
    "player record paper space ground form event official matter center couple site project activity star table "
    "need court oil situation cost industry figure street image phone data picture practice piece land product"
).split()


@dataclass
class RequestSpec:
    messages: list[dict]
    max_tokens: int


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    ttft: float = 0.0  # seconds to the first delta
    itl: list[float] = field(default_factory=list)  # seconds between deltas
    latency: float = 0.0  # seconds to the end of the stream
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class LoadSpec:
    dataset: str = "random"  # random | shared-prefix
    num_prompts: int = 100
    input_len: int = 512  # prompt tokens of each request besides the shared prefix and images (template included)
    prefix_len: int = 0  # tokens of the shared part (shared-prefix)
    output_len: int = 128
    images: int = 0  # images per request
    image_size: int = 448
    temperature: float = 0.0
    seed: int = 0


# -- prompts --------------------------------------------------------------------------------------------------


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(0, n)))


def png_data_url(size: int, seed: int) -> str:
    """A random-noise RGB image, size x size pixels, as a PNG data URL (distinct per seed)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass(frozen=True)
class Calibration:
    """Prompt tokens = overhead + per_word x words, as this server's tokenizer and chat template count them."""

    overhead: float
    per_word: float

    def words_for(self, tokens: int) -> int:
        return max(1, round(tokens / self.per_word))


def build_requests(spec: LoadSpec, cal: Calibration, round_: int = 0, n: int | None = None) -> list[RequestSpec]:
    """``n`` (default num_prompts) requests; each ``round_`` its own prompts and images (a round's prompts never
    hit what an earlier round left in the prefix cache), around the same shared prefix."""
    sharing = spec.dataset == "shared-prefix"
    shared = words(cal.words_for(spec.prefix_len), random.Random(spec.seed)) if sharing else ""
    shared_images = [png_data_url(spec.image_size, 10_000 + i) for i in range(spec.images)]
    rng = random.Random(spec.seed * 1000 + round_ + 1)
    out = []
    for r in range(spec.num_prompts if n is None else n):
        own = words(cal.words_for(spec.input_len - cal.overhead), rng)
        if sharing:
            text, images = shared + "\n\n" + own, shared_images
        else:
            text, images = own, [png_data_url(spec.image_size, rng.getrandbits(32)) for _ in range(spec.images)]
        content = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": text}]
        out.append(RequestSpec([{"role": "user", "content": content if images else text}], spec.output_len))
    return out


# -- one request ----------------------------------------------------------------------------------------------


async def send(client, url: str, model: str, req: RequestSpec, temperature: float) -> RequestResult:
    """One streamed chat completion; never raises (a failure is a result with ``ok`` False)."""
    body = {"model": model, "messages": req.messages, "max_tokens": req.max_tokens, "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    res = RequestResult(ok=False)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = str(chunk["error"])[:200]
                    return res
                now = time.perf_counter()
                if _has_text(chunk):
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    _take_usage(res, chunk["usage"])
    except Exception as e:  # a dropped connection or timeout ends this request only
        res.error = f"{type(e).__name__}: {e}"[:200]
        return res
    res.latency = time.perf_counter() - start
    res.ok = res.completion_tokens > 0
    return res


def _has_text(chunk: dict) -> bool:
    for c in chunk.get("choices") or []:
        d = c.get("delta") or {}
        if d.get("content") or d.get("reasoning_content"):
            return True
    return False


def _take_usage(res: RequestResult, usage: dict) -> None:
    res.prompt_tokens = usage.get("prompt_tokens", 0)
    res.completion_tokens = usage.get("completion_tokens", 0)
    res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0


class ServerError(RuntimeError):
    """The server refused or failed a request the benchmark cannot do without."""


async def calibrate(client, url: str, model: str, n: int = 64) -> Calibration:
    """Two one-token requests of 4 and 4 + n words: what a word and the chat template cost in prompt tokens."""
    rng = random.Random(12345)
    counts = []
    for k in (4, 4 + n):
        r = await send(client, url, model, RequestSpec([{"role": "user", "content": words(k, rng)}], 1), 0.0)
        if not r.ok:
            raise ServerError(f"the calibration request failed: {r.error}")
        counts.append(r.prompt_tokens)
    per_word = (counts[1] - counts[0]) / n
    return Calibration(overhead=counts[0] - 4 * per_word, per_word=per_word)


# -- a rate -----------------------------------------------------------------------------------------------------


async def run_rate(client, url: str, model: str, requests: list[RequestSpec], rate: float, temperature: float,
                   max_concurrency: int | None, seed: int) -> tuple[list[RequestResult], float]:
    """Send ``requests`` with Poisson arrivals at ``rate`` per second (inf: all at once), at most
    ``max_concurrency`` in flight; returns the results and the seconds from the first send to the last end."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(req: RequestSpec) -> RequestResult:
        if gate is None:
            return await send(client, url, model, req, temperature)
        async with gate:
            return await send(client, url, model, req, temperature)

    start = time.perf_counter()
    tasks = []
    for req in requests:
        tasks.append(asyncio.create_task(one(req)))
        if math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float) -> dict:
    """The serving figures of one rate (times in ms)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.completion_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.completion_tokens - 1) for r in ok if r.completion_tokens > 1]
    res = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
           "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
           "total_token_throughput": (in_tokens + out_tokens) / duration,
           "mean_prompt_tokens": in_tokens / len(ok) if ok else 0.0,
           "mean_output_tokens": out_tokens / len(ok) if ok else 0.0,
           "cached_prompt_fraction": sum(r.cached_tokens for r in ok) / in_tokens if in_tokens else 0.0}
    for name, values in (("ttft", [r.ttft for r in ok]), ("tpot", tpot), ("itl", [x for r in ok for x in r.itl]),
                         ("e2el", [r.latency for r in ok])):
        res.update({f"{k}_{name}_ms": v * 1e3 for k, v in _stats(values).items()})
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        res["errors"] = errors[:5]
    return res


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    s = sorted(values)
    return {"mean": statistics.fmean(s), "median": statistics.median(s),
            "p99": s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]}
