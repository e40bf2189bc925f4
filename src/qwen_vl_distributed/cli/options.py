"""Arguments shared by the commands that run the model (generate, serve) and the one that plans it (plan).

Each run option's argparse ``dest`` is its RunOptions field name and its default is that field's default, so
``run_options`` copies them over without a list of its own, ``plan`` plans with exactly what ``serve`` would use,
and a new option needs only its RunOptions field and its argument here.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..checkpoint.hub import ModelSource, resolve_model
from ..engine.build import FP8_EXPERTS_MODES, RunOptions
from ..errors import UserError
from ..parallel.grid import MOE_MODES

DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunOptions) if f.default is not dataclasses.MISSING}


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


def add_model_args(p: argparse.ArgumentParser, model_group=None, required: bool = True) -> None:
    """--model (in ``model_group`` if given, e.g. a mutually exclusive group), --revision, --download."""
    (model_group or p).add_argument(
        "--model", required=required, metavar="DIR|ORG/NAME",
        help="checkpoint directory (config.json, safetensors, tokenizer), a Hugging Face cache folder "
             "(models--ORG--NAME), or a hub repo id resolved in the local Hugging Face cache")
    p.add_argument("--revision", default=None,
                   help="branch, tag or commit of a hub repo id or cache folder (default: main)")
    p.add_argument("--download", action="store_true",
                   help="fetch a hub repo id the local cache lacks from the Hugging Face hub (default: the cache "
                        "only; HF_HUB_OFFLINE=1 forbids downloading)")


def model_source(args) -> ModelSource:
    return resolve_model(args.model, args.revision, args.download)


def add_plan_args(p: argparse.ArgumentParser, max_batch: int = DEFAULTS["max_batch"]) -> None:
    """What the stage plan depends on (``engine.build.make_plan``)."""
    p.add_argument("--stages", type=int, default=DEFAULTS["stages"], metavar="S",
                   help=f"pipeline stages, each of --tensor-parallel-size processes (default {DEFAULTS['stages']})")
    p.add_argument("--tensor-parallel-size", "--tp", dest="tensor_parallel", type=int,
                   default=DEFAULTS["tensor_parallel"], metavar="N",
                   help="tensor ranks per stage (one process and GPU each): attention heads and experts split N "
                        f"ways, one all-reduce per attention and per MoE block (default {DEFAULTS['tensor_parallel']})")
    p.add_argument("--moe-parallel", dest="moe_parallel", choices=MOE_MODES, default=DEFAULTS["moe_parallel"],
                   help="how a stage's tensor ranks split the experts: ep = whole experts per rank, tp = a slice of "
                        "every expert's width; auto (default): tp where the width splits into whole fp8 blocks, "
                        "else ep")
    p.add_argument("--layers-per-stage", dest="layers_per_stage", type=_int_list, default=None, metavar="A,B,...",
                   help="explicit split, e.g. 22,24,24,24")
    p.add_argument("--gpu-mem", dest="gpu_mem_gb", type=_float_list, default=None, metavar="GB[,GB...]",
                   help="GPU memory per stage in decimal GB for the plan: one for every stage, or one per stage "
                        "(default on cuda: this machine's GPU size)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=DEFAULTS["device"],
                   help=f"where the stages run (default {DEFAULTS['device']})")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--max-batch", dest="max_batch", type=int, default=max_batch, metavar="B",
                   help=f"the most sequences running at once (KV memory is --max-total-tokens; default {max_batch})")
    p.add_argument("--max-len", dest="max_len", type=int, default=DEFAULTS["max_len"], metavar="N",
                   help=f"tokens per sequence, prompt + output (default {DEFAULTS['max_len']})")
    p.add_argument("--max-total-tokens", dest="max_total_tokens", type=int, default=None, metavar="N",
                   help="tokens of KV cache, all sequences together, on every stage (default with a GPU budget: what "
                        "the tightest stage has left after weights and activations; without: max-len x max-batch)")
    p.add_argument("--kv-block-size", dest="kv_block_size", type=int, default=DEFAULTS["kv_block_size"],
                   metavar="N", help=f"tokens per KV-cache block, a power of two (default {DEFAULTS['kv_block_size']})")
    p.add_argument("--prefill-chunk", dest="prefill_chunk", type=int, default=None, metavar="N",
                   help="tokens one step carries, decodes and prompt chunks together; longer prompts are prefilled "
                        "in chunks over several steps, an image or video frame never split (default: max-len x "
                        "max-batch, up to 8192)")
    p.add_argument("--fp8-experts", dest="fp8_experts", choices=FP8_EXPERTS_MODES, default=DEFAULTS["fp8_experts"],
                   help="an fp8 checkpoint's experts: keep them fp8 in memory (half the memory, the same weights), "
                        "or dequantize them at load time; auto (default): keep them on GPUs that run the fp8 "
                        "kernels (compute capability 8.9+), else dequantize; w8a8: keep them and quantise their "
                        "inputs to fp8 as well, per token and 128 columns (the release's dynamic activation "
                        "scheme: faster prompts, fp8 rounding of the inputs)")
    p.add_argument("--vision-fp8", dest="vision_fp8", action="store_true",
                   help="run the vision tower's block linears in fp8 (weights per row, inputs per patch, quantised "
                        "at load and run time) on GPUs of compute capability 8.9+, for faster images at fp8 "
                        "rounding of the tower (docs/parity.md gives its error against bf16; on the CPU a slower "
                        "reference runs)")


def add_run_ahead_args(p: argparse.ArgumentParser) -> None:
    """--run-ahead / --no-run-ahead into ``run_ahead``: True, False, or None (the default: RunOptions decides)."""
    ahead = p.add_mutually_exclusive_group()
    ahead.add_argument("--run-ahead", dest="run_ahead", action="store_const", const=True, default=None,
                       help="submit each decode step before reading the previous step's tokens, so that the host's "
                            "work overlaps the GPU's (one stage of one rank only; default: on there, on CUDA)")
    ahead.add_argument("--no-run-ahead", dest="run_ahead", action="store_const", const=False,
                       help="read each step's tokens before submitting the next (the synchronous order)")


def add_run_args(p: argparse.ArgumentParser, max_batch: int = DEFAULTS["max_batch"], model: bool = True) -> None:
    """``model``: take --model (commands that run a checkpoint); without, the caller says what runs."""
    if model:
        add_model_args(p)
    add_plan_args(p, max_batch)
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="compute every prompt whole instead of reusing earlier requests' cached prefixes")
    add_run_ahead_args(p)
    p.add_argument("--stage-timeout", dest="stage_timeout_s", type=float, default=DEFAULTS["stage_timeout_s"],
                   metavar="SEC",
                   help="seconds of silence after which a stage is declared hung and every process stops")
    p.add_argument("--quiet", action="store_true", help="no loading progress bar")


def run_options(args, source: ModelSource | None) -> RunOptions:
    """The RunOptions of the parsed arguments: every argument whose dest is a RunOptions field, the model's local
    directory and revision from ``source`` (None: no checkpoint, as ``plan --preset``)."""
    if args.stages < 1:
        raise UserError(f"--stages {args.stages}: must be at least 1")
    if args.tensor_parallel < 1:
        raise UserError(f"--tensor-parallel-size {args.tensor_parallel}: must be at least 1")
    if args.max_batch < 1 or args.max_len < 2:
        raise UserError("--max-batch must be >= 1 and --max-len >= 2")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise UserError(f"--prefill-chunk {args.prefill_chunk}: must be at least 1")
    if args.max_total_tokens is not None and args.max_total_tokens < 1:
        raise UserError(f"--max-total-tokens {args.max_total_tokens}: must be at least 1")
    if getattr(args, "run_ahead", None) is True and (args.stages != 1 or args.tensor_parallel != 1):
        raise UserError(f"--run-ahead: needs one stage of one rank (got --stages {args.stages} "
                        f"--tensor-parallel-size {args.tensor_parallel}); with several stages the micro-batch "
                        "groups already overlap the driver's work")
    bs = args.kv_block_size
    if not 1 <= bs <= 4096 or bs & (bs - 1):
        raise UserError(f"--kv-block-size {bs}: must be a power of two from 1 to 4096")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunOptions) if hasattr(args, f.name)}
    given.update(model=source.path if source else None, revision=source.revision if source else None,
                 dtype=args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    return RunOptions(**given)
