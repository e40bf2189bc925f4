"""A stage's all-reduces inside the decode CUDA graphs, on the one GPU there is: the layers' reduce hooks set to an NCCL
group's all-reduce (a group of one rank: a sum over one GPU, so the numbers must not move), the decode step captured
with them, and its replay compared with the eager step. What it checks: that capturing NCCL collectives with the
fused decode layer works on this torch / NCCL (the multi-GPU grid runs exactly this code with N ranks); what it does
not: the collectives' cost between GPUs.

    PYTHONPATH=src python3 scripts/tp_graph_check.py
"""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.distributed as dist

from qwen_vl_distributed.checkpoint.synth_weights import randomize_module
from qwen_vl_distributed.kernels import enable_fast_paths
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.model.qwen3_vl import Qwen3VLMoe
from qwen_vl_distributed.parallel.grid import Grid
from qwen_vl_distributed.parallel.group import StageGroup
from qwen_vl_distributed.parallel.shard import attach_reduce
from qwen_vl_distributed.pipeline.launch import free_port
from qwen_vl_distributed.runtime.cuda_graph import DecodeGraphs


def main() -> None:
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, device_id=dev)
    base = preset("235b-a22b")
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, num_hidden_layers=2))
    with torch.device("meta"):
        model = Qwen3VLMoe(cfg, layers=(0, 2), vision=False, embed=False, head=False)
    randomize_module(model, 0, dev, torch.bfloat16)
    group = StageGroup(Grid(1, 1), 0, dist.new_group([0], backend="nccl"), dist.new_group([0], backend="gloo"), dev)
    calls = []
    attach_reduce(model, lambda x: calls.append(1) or group.all_reduce(x))
    enable_fast_paths(model.eval())
    cache = model.new_cache(32, 16, 64)  # 8 sequences of up to 64 tokens, 4 blocks of 16 each
    tables = [list(range(4 * i, 4 * i + 4))[::-1] for i in range(8)]  # blocks out of order, as a pool hands them out
    graphs = DecodeGraphs(model, cache, buckets=(1, 8))
    out = {}
    for b in (1, 8):
        hidden = torch.randn(b, cfg.text.hidden_size, device=dev, dtype=torch.bfloat16) * 0.02
        graphs.load(tables[:b], [3] * b, torch.full((3, b), 3), hidden=hidden)
        with torch.inference_mode():
            eager = graphs.step(b).clone()
        out[f"eager_reduce_calls_B{b}"] = len(calls)
        calls.clear()
        if b == 1:
            graphs.capture()
            out["captured_reduce_calls"] = len(calls)
        graphs.load(tables[:b], [3] * b, torch.full((3, b), 3), hidden=hidden)
        replay = graphs.replay(b)
        torch.cuda.synchronize()
        out[f"replay_equals_eager_B{b}"] = bool(torch.equal(replay, eager))
        out[f"rel_B{b}"] = ((replay.double() - eager.double()).norm() / eager.double().norm()).item()
    dist.destroy_process_group()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
