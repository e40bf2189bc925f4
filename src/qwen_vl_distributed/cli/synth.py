"""``qwen-vl synth DIR``: write a complete synthetic HF-format model directory (random weights, real tokenizer
special tokens, the release's chat template, processor configs) -- what the demo and the tests run on."""

from __future__ import annotations

import os

from ..checkpoint.synth_processor import write_processor_files
from ..checkpoint.synth_weights import write_synthetic_weights
from ..errors import UserError
from ..model.config import PRESETS, preset


def add_parser(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic model directory with random weights")
    p.add_argument("dir")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", default=None, choices=["hf", "released", "per-expert"],
                   help="expert tensors: hf = transformers 5.x fused (default), released = the official fused "
                        "orientation, per-expert = one tensor per expert (the default with --fp8, as FP8 releases)")
    p.add_argument("--fp8", action="store_true", help="128x128 block-quantised FP8 attention and experts")
    p.add_argument("--chat-template", default="thinking", choices=["thinking", "instruct"],
                   help="the Thinking release's chat template (default), or the same with the Instruct generation "
                        "prompt, which opens no think block")
    p.add_argument("--force", action="store_true", help="write into a non-empty directory")
    p.set_defaults(run=run)


def synthesize(directory: str, preset_name: str = "tiny", seed: int = 0, layout: str = "hf",
               fp8: bool = False, chat_template: str = "thinking") -> str:
    cfg = preset(preset_name)
    os.makedirs(directory, exist_ok=True)
    write_synthetic_weights(directory, cfg, seed=seed, layout=layout, fp8=fp8)
    write_processor_files(directory, chat_template)
    return directory


def run(args) -> int:
    if os.path.isdir(args.dir) and os.listdir(args.dir) and not args.force:
        raise UserError(f"{args.dir}: directory is not empty (use --force to overwrite)")
    if args.preset not in ("tiny",):
        print(f"warning: preset {args.preset} writes the full-size model's weights to disk")
    layout = args.layout or ("per-expert" if args.fp8 else "hf")
    synthesize(args.dir, args.preset, args.seed, layout, args.fp8, args.chat_template)
    print(f"wrote synthetic {args.preset} model to {args.dir}")
    return 0
