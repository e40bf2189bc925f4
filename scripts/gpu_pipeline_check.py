"""On a GPU machine: the S-stage pipeline (NCCL between GPUs, CUDA graphs) equals S = 1, token for token.

    PYTHONPATH=src python3 scripts/gpu_pipeline_check.py MODEL_DIR --stages 2
"""

from __future__ import annotations

import argparse
import json
import sys

sys.path.insert(0, "tests")

from mm_inputs import chat, image_tokens, pixels, video_tokens  # noqa: E402
from qwen_vl_distributed.engine.build import RunOptions, start_engine  # noqa: E402
from qwen_vl_distributed.engine.engine import Prompt  # noqa: E402
from qwen_vl_distributed.engine.sampling import SamplingParams  # noqa: E402


def requests():
    imgs = [(1, 4, 4), (1, 6, 10)]
    toks = [100] + image_tokens(4, 4) + [200] + image_tokens(6, 10) + [300]
    return [Prompt(chat([100, 2000, 30000, 400, 5])), Prompt(chat(toks), None, pixels(76, 1536, 1), imgs),
            Prompt(chat(video_tokens(2, 4, 6) + [7]), None, None, None, pixels(48, 1536, 2), [(2, 4, 6)]),
            Prompt(chat([9] * 40)), Prompt(chat([11, 12]))]


def run(model: str, stages: int) -> tuple[list, list]:
    handle = start_engine(RunOptions(model=model, stages=stages, device="cuda", dtype="bfloat16", max_batch=8,
                                     max_len=256, quiet=True))
    try:
        greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
        seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_new_tokens=16)
        seqs = [handle.engine.add(p, greedy if i % 2 == 0 else seeded) for i, p in enumerate(requests())]
        handle.engine.run_until_done()
        return [s.output for s in seqs], handle.engine.executor.stage_stats()
    finally:
        handle.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--stages", type=int, default=2)
    a = ap.parse_args()
    one, _ = run(a.model, 1)
    many, stats = run(a.model, a.stages)
    print(json.dumps({"stages": a.stages, "identical": one == many, "single": one, "pipeline": many,
                      "stage_stats": stats}))
    sys.exit(0 if one == many else 1)
