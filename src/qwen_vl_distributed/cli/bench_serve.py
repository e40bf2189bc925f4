"""``qwen-vl bench-serve``: a serving benchmark against an OpenAI-compatible server, at one or more request rates.

Point it at a running server (``--url``) or let it start one over random weights of a preset (``--preset``, with
the run options of ``qwen-vl serve``: ``--layers``, ``--device``, ``--max-batch``, ``--max-total-tokens``,
``--no-prefix-cache``, ...) in a process of its own. Requests arrive as a Poisson process at each ``--rates``
value (requests per second; ``inf``: all at once); each rate sends ``--num-prompts`` new requests, after
``--warmup`` requests that are not counted. Request sets (``--dataset``): ``random`` or ``shared-prefix``
(``--prefix-len`` tokens common to every prompt), with ``--images`` random images per request. Reports request
throughput, output tokens/s, TTFT, TPOT and ITL (mean, median, p99) per rate, and where the server exports them
(vLLM's counters, which ours exports too) its prefix-cache queries, hits and preemptions during the rate;
``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import sys

from ..errors import UserError
from ..model.config import PRESETS
from .options import add_run_args, run_options

# vLLM's counter names (our server exports them too), reported without the "vllm:" prefix
METRICS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total")


def add_parser(sub) -> None:
    p = sub.add_parser("bench-serve", help="serving benchmark: Poisson request rates against an OpenAI server",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--preset", choices=sorted(PRESETS), help="start a server over random weights of a preset")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the started server (default: all)")
    p.add_argument("--port", type=int, default=0, help="port of the started server (default: a free one)")
    p.add_argument("--served-model", default=None, help="model id to send (default: the server's first model)")
    add_run_args(p, max_batch=32, model=False)
    p.add_argument("--dataset", choices=["random", "shared-prefix"], default="random")
    p.add_argument("--num-prompts", type=int, default=100, help="requests per rate")
    p.add_argument("--input-len", type=int, default=512,
                   help="prompt tokens of each request besides the shared prefix and images")
    p.add_argument("--prefix-len", type=int, default=0, help="tokens every prompt shares (shared-prefix)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of every request")
    p.add_argument("--images", type=int, default=0, help="random images per request")
    p.add_argument("--image-size", type=int, default=448, help="side of each image in pixels")
    p.add_argument("--rates", default="inf", help="requests per second, comma-separated (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--warmup", type=int, default=2, help="requests sent first and not counted")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT", help="write every figure here")
    p.set_defaults(run=run)


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--rates {text!r}: expected comma-separated numbers or inf") from None
    if not rates or any(not r > 0 for r in rates):
        raise UserError(f"--rates {text!r}: every rate must be above 0")
    return rates


def _load_spec(args):
    from ..bench.serve_load import LoadSpec

    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.dataset == "shared-prefix" and args.prefix_len < 1:
        raise UserError("--dataset shared-prefix needs --prefix-len of at least 1")
    return LoadSpec(dataset=args.dataset, num_prompts=args.num_prompts, input_len=args.input_len,
                    prefix_len=args.prefix_len, output_len=args.output_len, images=args.images,
                    image_size=args.image_size, temperature=args.temperature, seed=args.seed)


def run(args) -> int:
    import httpx

    from ..bench.random_server import RandomServer
    from ..bench.serve_load import ServerError
    from ..pipeline.launch import free_port

    spec, rates = _load_spec(args), parse_rates(args.rates)
    server, url = None, args.url
    if args.preset:
        opts = dataclasses.replace(run_options(args, None), random_preset=args.preset, random_layers=args.layers,
                                   quiet=True)
        server = RandomServer(opts, args.port or free_port())
        server.wait_ready()
        url = server.url
    try:
        result = asyncio.run(sweep(url.rstrip("/"), args.served_model, spec, rates, args.max_concurrency,
                                   args.warmup))
    except (ServerError, httpx.HTTPError) as e:
        raise UserError(f"bench-serve: {url}: {e}") from None
    finally:
        if server is not None:
            server.stop()
    result["command"] = "qwen-vl " + " ".join(sys.argv[1:])
    print("\n".join(table(result)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


async def sweep(url: str, model: str | None, spec, rates: list[float], max_concurrency: int | None,
                warmup: int) -> dict:
    """Calibrate, warm up, then one round of new requests per rate; returns every figure."""
    import httpx

    from ..bench import serve_load as sl

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        model = model or (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        cal = await sl.calibrate(client, url, model)
        if warmup:
            await sl.run_rate(client, url, model, sl.build_requests(spec, cal, 0, warmup), math.inf,
                              spec.temperature, None, spec.seed)
        out = {"server": url, "model": model, "calibration": dataclasses.asdict(cal),
               "load": dataclasses.asdict(spec), "max_concurrency": max_concurrency, "rates": {}}
        for i, rate in enumerate(rates):
            before = await _scrape(client, url)
            results, duration = await sl.run_rate(client, url, model, sl.build_requests(spec, cal, i + 1), rate,
                                                  spec.temperature, max_concurrency, spec.seed + i)
            row = sl.summarize(results, duration)
            after = await _scrape(client, url)
            row["server_counters"] = {k: after[k] - before.get(k, 0.0) for k in after}
            out["rates"][str(rate)] = row
    return out


async def _scrape(client, url: str) -> dict[str, float]:
    """The server's prefix-cache and preemption counters (none when it does not export them)."""
    try:
        text = (await client.get(url + "/metrics")).text
    except Exception:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        name = sample.split("{")[0]
        if name in METRICS:  # summed over label sets (one per served model)
            key = name.removeprefix("vllm:")
            out[key] = out.get(key, 0.0) + float(value)
    return out


def table(result: dict) -> list[str]:
    load = result["load"]
    lines = [f"{result['server']} ({result['model']}): {load['dataset']}, {load['num_prompts']} requests per rate, "
             f"~{load['input_len']} prompt tokens (+{load['prefix_len']} shared, {load['images']} images), "
             f"{load['output_len']} output tokens",
             f"{'rate':>6} {'done':>5} {'req/s':>7} {'out tok/s':>10} {'TTFT ms mean/p50/p99':>22} "
             f"{'TPOT ms mean/p50/p99':>22} {'ITL ms mean/p50/p99':>22} {'cached':>7}"]
    for rate, r in result["rates"].items():
        trio = lambda k: f"{r[f'mean_{k}_ms']:.1f}/{r[f'median_{k}_ms']:.1f}/{r[f'p99_{k}_ms']:.1f}"  # noqa: E731
        lines.append(f"{rate:>6} {r['completed']:>5} {r['request_throughput']:>7.2f} {r['output_throughput']:>10.1f} "
                     f"{trio('ttft'):>22} {trio('tpot'):>22} {trio('itl'):>22} "
                     f"{100 * r['cached_prompt_fraction']:>6.1f}%")
        if r.get("errors"):
            lines.append(f"       failed {r['failed']}: {r['errors'][0]}")
    return lines
