"""Arguments shared by the commands that run the model (generate, serve, worker, demo)."""

from __future__ import annotations

import argparse

from ..engine.build import RunOptions
from ..errors import UserError
from ..parallel.grid import MOE_MODES


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


def add_run_args(p: argparse.ArgumentParser, max_batch: int = 8) -> None:
    p.add_argument("--model", required=True, help="HF checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("--stages", type=int, default=1,
                   help="pipeline stages, each of --tensor-parallel-size processes (default 1)")
    add_grid_args(p)
    p.add_argument("--layers-per-stage", type=_int_list, default=None, help="explicit split, e.g. 22,24,24,24")
    p.add_argument("--gpu-mem", type=_float_list, default=None, metavar="GB[,GB...]",
                   help="GPU memory per stage in GB for the plan (default on cuda: this machine's GPU size)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--max-batch", type=int, default=max_batch, help="concurrent sequences (KV-cache slots)")
    p.add_argument("--max-len", type=int, default=4096, help="tokens per sequence, prompt + output")
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


def add_grid_args(p: argparse.ArgumentParser) -> None:
    """--tensor-parallel-size / --tp and --moe-parallel (run commands, plan, bench)."""
    p.add_argument("--tensor-parallel-size", "--tp", dest="tp", type=int, default=1, metavar="N",
                   help="tensor ranks per stage (one process and GPU each): attention heads and experts split N "
                        "ways, one all-reduce per attention and per MoE block (default 1)")
    p.add_argument("--moe-parallel", choices=MOE_MODES, default="auto",
                   help="how a stage's tensor ranks split the experts: ep = whole experts per rank, tp = a slice of "
                        "every expert's width; auto (default): tp where the width splits into whole fp8 blocks, "
                        "else ep")


def run_options(args) -> RunOptions:
    if args.stages < 1:
        raise UserError(f"--stages {args.stages}: must be at least 1")
    if args.tp < 1:
        raise UserError(f"--tensor-parallel-size {args.tp}: must be at least 1")
    if args.max_batch < 1 or args.max_len < 2:
        raise UserError("--max-batch must be >= 1 and --max-len >= 2")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise UserError(f"--prefill-chunk {args.prefill_chunk}: must be at least 1")
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return RunOptions(model=args.model, stages=args.stages, tensor_parallel=args.tp, moe_parallel=args.moe_parallel,
                      device=args.device, dtype=dtype,
                      max_batch=args.max_batch, max_len=args.max_len, prefill_chunk=args.prefill_chunk,
                      layers_per_stage=args.layers_per_stage,
                      gpu_mem_gb=args.gpu_mem,
                      stage_timeout_s=args.stage_timeout, quiet=args.quiet, fp8_experts=args.fp8_experts)
