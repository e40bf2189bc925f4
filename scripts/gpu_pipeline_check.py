"""On a GPU machine: the S-stage pipeline (NCCL between GPUs, CUDA graphs) equals S = 1, token for token. Chunked
prefill (16-token chunks) and a second turn that reuses the first turn's cached prefix are compared with whole
prompts too; they must be identical in float32 only: in bf16 a chunk or a suffix runs other kernel shapes than the
whole prompt (attention over the cache, other expert tiles), whose roundings can flip a near-tie of a random
model's logits. For an fp8 checkpoint the experts stay fp8 (``--fp8-experts keep``) and the pipeline is also run
with them dequantised at load: identical tokens required in float32 (in bf16 the two kernels' products differ in
rounding, not in weights).

    PYTHONPATH=src python3 scripts/gpu_pipeline_check.py MODEL_DIR --stages 2
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, "tests")

from mm_inputs import chat, image_tokens, pixels, video_tokens  # noqa: E402
from qwen_vl_distributed.engine.build import RunOptions, start_engine  # noqa: E402
from qwen_vl_distributed.engine.engine import Prompt  # noqa: E402
from qwen_vl_distributed.engine.sampling import SamplingParams  # noqa: E402


DTYPE = "bfloat16"
FP8 = "keep"


def requests():
    imgs = [(1, 4, 4), (1, 6, 10)]
    toks = [100] + image_tokens(4, 4) + [200] + image_tokens(6, 10) + [300]
    return [Prompt(chat([100, 2000, 30000, 400, 5])), Prompt(chat(toks), None, pixels(76, 1536, 1), imgs),
            Prompt(chat(video_tokens(2, 4, 6) + [7]), None, None, None, pixels(48, 1536, 2), [(2, 4, 6)]),
            Prompt(chat([9] * 40)), Prompt(chat([11, 12]))]


def run(model: str, stages: int, chunk: int | None = None, fp8: str | None = None) -> tuple[list, list]:
    handle = start_engine(RunOptions(model=model, stages=stages, device="cuda", dtype=DTYPE, max_batch=8,
                                     max_len=256, quiet=True, prefill_chunk=chunk, fp8_experts=fp8 or FP8))
    try:
        greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
        seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_new_tokens=16)
        seqs = [handle.engine.add(p, greedy if i % 2 == 0 else seeded) for i, p in enumerate(requests())]
        handle.engine.run_until_done()
        return [s.output for s in seqs], handle.engine.executor.stage_stats()
    finally:
        handle.close()


def second_turn(model: str, stages: int, warm: bool) -> tuple[list, int]:
    """A chat's second turn (the first turn's prompt and answer, then a new image): after the first turn ran in the
    same engine (``warm``: its cached prefix is reused) or alone. Returns its tokens and the reused count."""
    handle = start_engine(RunOptions(model=model, stages=stages, device="cuda", dtype=DTYPE, max_batch=2,
                                     max_len=256, quiet=True, fp8_experts=FP8))
    try:
        first = chat([100] + image_tokens(4, 4) + [200]) + [151667, 11, 151668, 13, 14]
        img1, img2 = pixels(16, 1536, 1), pixels(60, 1536, 3)
        greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
        if warm:
            handle.engine.add(Prompt(first, None, img1, [(1, 4, 4)]), SamplingParams(temperature=0.0,
                                                                                     max_new_tokens=1))
            handle.engine.run_until_done()
        second = first + [151645, 198] + chat([300] + image_tokens(6, 10) + [301])
        seq = handle.engine.add(Prompt(second, None, torch.cat([img1, img2]), [(1, 4, 4), (1, 6, 10)]), greedy)
        handle.engine.run_until_done()
        return seq.output, seq.cached_tokens
    finally:
        handle.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--dtype", default=DTYPE)
    ap.add_argument("--fp8-experts", default=FP8, choices=["keep", "w8a8", "dequantize"])
    a = ap.parse_args()
    DTYPE, FP8 = a.dtype, a.fp8_experts
    with open(f"{a.model}/config.json") as f:
        fp8_ckpt = json.load(f).get("quantization_config", {}).get("quant_method") == "fp8"
    one, _ = run(a.model, 1)
    many, stats = run(a.model, a.stages)
    chunked, _ = run(a.model, a.stages, chunk=16)
    (warm, reused), (cold, _) = second_turn(a.model, a.stages, True), second_turn(a.model, a.stages, False)
    # keep and dequantize compute with the same weights; W8A8 (inputs quantised too) has only itself to equal
    other = (run(a.model, a.stages, fp8="dequantize" if FP8 == "keep" else "keep")[0]
             if fp8_ckpt and FP8 != "w8a8" else many)
    ok = one == many and reused > 0 and ((chunked == one and warm == cold and other == many) or DTYPE != "float32")
    print(json.dumps({"stages": a.stages, "identical": one == many, "chunked_identical": chunked == one,
                      "fp8_checkpoint": fp8_ckpt, "fp8_keep_equals_dequantize": other == many,
                      "chunked_equal_per_prompt": [x == y for x, y in zip(chunked, one)],
                      "second_turn_identical": warm == cold, "second_turn_reused": reused, "single": one,
                      "pipeline": many, "chunked": chunked, "stage_stats": stats}))
    sys.exit(0 if ok else 1)
