"""``qwen-vl generate``: one request through the engine (any number of stages), streamed or as JSON."""

from __future__ import annotations

import json
import sys

from ..engine.build import read_generation_config, start_engine, torchrun_worker
from ..engine.media import MediaOptions
from ..engine.processor import Processor
from ..engine.sampling import SamplingParams
from ..engine.session import TextStream, result_dict, to_prompt
from ..errors import UserError
from .options import add_run_args, run_options


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate a reply for one prompt")
    add_run_args(p, max_batch=1)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="user text (images/videos given with --image/--video come before it)")
    src.add_argument("--messages", help="JSON file with an OpenAI-style chat messages list")
    p.add_argument("--image", action="append", default=[], help="image path (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video path (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: generation_config)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(run=run)


def read_messages(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--messages {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--messages {path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    if not isinstance(data, list):
        raise UserError(f"--messages {path}: expected a JSON list of messages (or an object with 'messages')")
    return data


def sampling_params(args, model_dir: str) -> SamplingParams:
    return SamplingParams.from_generation_config(read_generation_config(model_dir), temperature=args.temperature,
                                                 top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                                 max_new_tokens=args.max_new_tokens)


def run(args) -> int:
    opts = run_options(args)
    status = torchrun_worker(opts)
    if status is not None:  # a stage other than 0, started by torchrun
        return status
    # Everything a user can get wrong is checked before any process starts.
    from ..model.config import load_config

    cfg = load_config(opts.model)
    processor = Processor.from_pretrained(opts.model, cfg, MediaOptions())
    inputs = (processor.build_inputs(read_messages(args.messages)) if args.messages
              else processor.build_from_prompt(args.prompt, args.image, args.video))
    params = sampling_params(args, opts.model)
    if len(inputs.input_ids) >= opts.max_len:
        raise UserError(f"the prompt is {len(inputs.input_ids)} tokens; --max-len {opts.max_len} leaves no room "
                        "for output")
    handle = start_engine(opts)
    try:
        result = generate_one(handle.engine, processor, inputs, params, stream=not args.json)
    except KeyboardInterrupt:
        _stop_after_interrupt(handle)
        raise
    except BaseException:
        handle.abort()
        raise
    handle.close()
    if args.json:
        print(json.dumps(result))
    return 0


def _stop_after_interrupt(handle) -> None:
    """Ctrl-C: let the steps in flight finish and 'stop' go round, so every worker leaves quietly; if the pipeline
    is broken as well, fall back to killing the workers."""
    try:
        handle.close()
    except BaseException:
        handle.abort()


def generate_one(engine, processor, inputs, params, stream: bool) -> dict:
    """Run one request to the end; stream reasoning (dim) and answer to the terminal if asked."""
    seq = engine.add(to_prompt(inputs), params)
    text = TextStream(processor)
    tty = sys.stdout.isatty()
    shown_answer = False
    if stream:
        print("[thinking] " if not tty else "\033[2m", end="", flush=True)
    while not seq.done:
        for ev in engine.step():
            if ev.seq is not seq or not stream:
                continue
            r, c, _ = text.add(ev.token)
            if ev.finished:
                r2, c2, _ = text.finish()
                r, c = r + r2, c + c2
            if r:
                print(r, end="", flush=True)
            if c:
                if not shown_answer:
                    print("\033[0m\n\n" if tty else "\n[answer] ", end="")
                    shown_answer = True
                print(c, end="", flush=True)
    if stream:
        print("\033[0m" if tty else "", flush=True)
    full = processor.decode(seq.output)
    return result_dict(seq, list(inputs.input_ids), full, engine.executor.stage_stats())
