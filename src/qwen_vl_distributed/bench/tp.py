"""The 'tp' section of ``qwen-vl bench``: decode of ONE tensor rank's shard of the real layers, on one GPU.

For each N of ``BenchOptions.tp`` and each way of splitting the experts (``tp``: a 1/N slice of every expert's width;
``ep``: E/N whole experts), a layers-only stage of the preset's real-size layers is cut to a rank's share
(parallel.shard: heads / N, kv heads split or one replicated, experts), given random weights on the GPU and timed
under CUDA-graph replay (the fused decode layer) at each decode batch. With ``ep`` the routing decides how many of a
token's K experts a rank holds, so every rank's expert range is timed and the slowest is what a step waits for.

The collectives are NOT in these times: the stage has no group, so a rank's partial outputs are not summed. The
projection (``project``) adds an all-reduce latency given as an input (``--allreduce-us``), never measured here.

Shapes: N tensor ranks, B decode batch, L layers built, H hidden, V vocab.
"""

from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F

from ..checkpoint.synth_weights import randomize_module
from ..kernels import enable_fast_paths
from ..model.qwen3_vl import Qwen3VLMoe
from ..parallel.grid import Grid, check_grid, experts_of
from ..parallel.shard import shard_stage
from .timing import cuda_time

BF16 = torch.bfloat16


def _shard(bench, tp: int, moe: str) -> Qwen3VLMoe:
    """Rank 0's share of a layers-only stage, random bf16 weights on the bench's GPU, fast paths on."""
    grid = Grid(1, tp, moe)
    check_grid(bench.cfg, grid)
    with torch.device("meta"):
        model = Qwen3VLMoe(bench.cfg, layers=(0, bench.n), vision=False, embed=False, head=False)
    shard_stage(model, grid, 0)
    randomize_module(model, bench.opts.seed, bench.dev, BF16)
    return enable_fast_paths(model.eval(), choices=bench.choices)


def _set_expert_rank(model: Qwen3VLMoe, cfg, tp: int, rank: int) -> None:
    for layer in model.model.language_model.layers.values():
        layer.mlp.experts.expert_range = experts_of(cfg, tp, rank)


def _decode_ms(bench, model: Qwen3VLMoe) -> dict[int, float]:
    """Milliseconds per layer of a decode step at each batch, replayed from CUDA graphs over a paged KV cache of
    the kv heads the rank holds (the bench's block size, shuffled block tables)."""
    ctx = bench.opts.context
    graphs, tables = bench._decode_graphs(model, bench.opts.kv_block_size)
    graphs.capture()
    out = {}
    for b in bench.batches:
        bench._load(graphs, tables, b, ctx)
        out[b] = cuda_time(lambda: graphs.replay(b), iters=20, reps=5) / bench.n
    return out


def _time_shard(bench, tp: int, moe: str) -> dict:
    model = _shard(bench, tp, moe)
    a = model.model.language_model.layers["0"].self_attn
    row = {"heads": a.num_heads, "kv_heads": a.num_kv_heads,
           "weight_gb_layer": sum(p.numel() * p.element_size() for p in model.parameters()) / bench.n / 1e9}
    if moe == "tp" or tp == 1:
        row["ms_layer"] = _decode_ms(bench, model)
        return row
    per_rank = []
    for r in range(tp):  # the same weights stand for each rank's experts: only which pairs are local changes
        _set_expert_rank(model, bench.cfg, tp, r)
        per_rank.append(_decode_ms(bench, model))
    row["ms_layer_by_rank"] = per_rank
    row["ms_layer"] = {b: max(r[b] for r in per_rank) for b in bench.batches}  # a step waits for the slowest
    row["ms_layer_mean"] = {b: statistics.mean(r[b] for r in per_rank) for b in bench.batches}
    return row


def _lm_head_ms(bench) -> dict[int, float]:
    """The last stage's lm_head ([V, H] bf16, whole on every tensor rank) per decode batch, from a CUDA graph."""
    t = bench.cfg.text
    w = torch.randn(t.vocab_size, t.hidden_size, device=bench.dev, dtype=BF16) * 0.02
    out = {}
    for b in bench.batches:
        x = torch.randn(b, t.hidden_size, device=bench.dev, dtype=BF16)
        out[b] = bench._graph_ms(lambda: F.linear(x, w))
    return out


def section(bench) -> dict:
    """Every N x expert split: rank timings; then the lm_head, and the projection for the whole model."""
    res: dict = {"note": "one rank's compute only: collectives not included"}
    for tp in bench.opts.tp:
        for moe in (("tp", "ep") if tp > 1 else ("tp",)):
            row = res[f"N{tp}_{moe}"] = _time_shard(bench, tp, moe)
            print(f"tp section: N={tp} {moe}: ms/layer {row['ms_layer']}", file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
    res["lm_head_ms"] = _lm_head_ms(bench)
    res["projection"] = project(res, bench.full_layers, bench.opts.allreduce_us)
    return res


def project(res: dict, layers: int, allreduce_us: float) -> dict:
    """Single-stream decode of the whole model on one stage of N ranks: per token, every layer's slowest-rank time
    plus two all-reduces (attention, MoE) of ``allreduce_us`` each, plus the lm_head (embedding and final norm are
    a few microseconds). tok/s = B / step time."""
    out = {"allreduce_us": allreduce_us, "layers": layers}
    for key, row in res.items():
        if not key.startswith("N"):
            continue
        for b, ms in row["ms_layer"].items():
            step_ms = layers * (ms + 2 * allreduce_us / 1e3) + res["lm_head_ms"][b]
            out[f"{key}_B{b}"] = {"step_ms": step_ms, "tok_s": b / (step_ms / 1e3),
                                  "collectives_ms": layers * 2 * allreduce_us / 1e3}
    return out
