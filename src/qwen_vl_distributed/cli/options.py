"""Arguments shared by the commands that run the model (generate, serve, worker, demo)."""

from __future__ import annotations

import argparse

from ..engine.build import RunOptions
from ..pipeline.plan import DEFAULT_KV_BLOCK_SIZE
from ..errors import UserError


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_run_args(p: argparse.ArgumentParser, max_batch: int = 8, model: bool = True) -> None:
    """``model``: take --model (commands that run a checkpoint); without, the caller says what runs."""
    if model:
        p.add_argument("--model", required=True, help="HF checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("--stages", type=int, default=1, help="pipeline stages, one process each (default 1)")
    p.add_argument("--layers-per-stage", type=_int_list, default=None, help="explicit split, e.g. 22,24,24,24")
    p.add_argument("--gpu-mem", type=_float_list, default=None, metavar="GB[,GB...]",
                   help="GPU memory per stage in GB for the plan (default on cuda: this machine's GPU size)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--max-batch", type=int, default=max_batch,
                   help="the most sequences running at once (KV memory is --max-total-tokens)")
    p.add_argument("--max-len", type=int, default=4096, help="tokens per sequence, prompt + output")
    p.add_argument("--max-total-tokens", type=int, default=None, metavar="N",
                   help="tokens of KV cache, all sequences together, on every stage (default on cuda: what the "
                        "GPUs have left after weights and activations, from the plan; on cpu: max-len x max-batch)")
    p.add_argument("--kv-block-size", type=int, default=DEFAULT_KV_BLOCK_SIZE, metavar="N",
                   help=f"tokens per KV-cache block, a power of two (default {DEFAULT_KV_BLOCK_SIZE})")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="compute every prompt whole instead of reusing earlier requests' cached prefixes")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="tokens one step carries (decodes plus prompt chunks); longer prompts are prefilled in "
                        "chunks over several steps (default: max-len x max-batch, up to 8192)")
    p.add_argument("--stage-timeout", type=float, default=60.0,
                   help="seconds of silence after which a stage is declared hung and every process stops")
    p.add_argument("--quiet", action="store_true", help="no loading progress bar")
    p.add_argument("--fp8-experts", choices=["auto", "keep", "w8a8", "dequantize"], default="auto",
                   help="an fp8 checkpoint's experts: keep them fp8 in memory (half the memory, the same weights), "
                        "or dequantize them at load time; auto (default): keep them on GPUs that run the fp8 "
                        "kernels (compute capability 8.9+), else dequantize; w8a8: keep them and quantise their "
                        "inputs to fp8 as well, per token and 128 columns (the release's dynamic activation "
                        "scheme: faster prompts, fp8 rounding of the inputs)")


def run_options(args) -> RunOptions:
    if args.stages < 1:
        raise UserError(f"--stages {args.stages}: must be at least 1")
    if args.max_batch < 1 or args.max_len < 2:
        raise UserError("--max-batch must be >= 1 and --max-len >= 2")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise UserError(f"--prefill-chunk {args.prefill_chunk}: must be at least 1")
    if args.max_total_tokens is not None and args.max_total_tokens < 1:
        raise UserError(f"--max-total-tokens {args.max_total_tokens}: must be at least 1")
    bs = args.kv_block_size
    if not 1 <= bs <= 4096 or bs & (bs - 1):
        raise UserError(f"--kv-block-size {bs}: must be a power of two from 1 to 4096")
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return RunOptions(model=getattr(args, "model", None), stages=args.stages, device=args.device, dtype=dtype,
                      max_batch=args.max_batch, max_len=args.max_len, prefill_chunk=args.prefill_chunk,
                      max_total_tokens=args.max_total_tokens, kv_block_size=bs,
                      prefix_cache=not args.no_prefix_cache,
                      layers_per_stage=args.layers_per_stage,
                      gpu_mem_gb=args.gpu_mem,
                      stage_timeout_s=args.stage_timeout, quiet=args.quiet, fp8_experts=args.fp8_experts)
