"""``qwen-vl bench-pipeline``: the S-stage pipeline end to end (engine, processes, transport) on random weights of
real dimensions: per-token latency of one sequence, throughput with several sequences in flight, and (one stage)
the host's share of a decode step at several batch sizes (bench.host_share)."""

from __future__ import annotations

import hashlib
import json
import time

import torch

from ..bench.host_share import BATCHES, host_share, tokens_needed
from ..engine.build import RunOptions, start_engine
from ..engine.engine import Prompt
from ..engine.sampling import SamplingParams
from ..errors import UserError
from ..model.config import PRESETS
from .options import add_run_ahead_args


def add_parser(sub) -> None:
    p = sub.add_parser("bench-pipeline", help="benchmark the multi-process pipeline on random real-size weights")
    p.add_argument("--preset", default="235b-a22b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=8, help="decoder layers in all (split over the stages)")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--sequences", type=int, default=0, help="concurrent sequences for throughput (default 4*S)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature of every sequence (0: greedy, as before session 10; see _run_batch)")
    p.add_argument("--fp8", action="store_true",
                   help="experts quantised to fp8 (128x128 blocks) and kept so, as a run of an FP8 release keeps them")
    p.add_argument("--w8a8", action="store_true",
                   help="as --fp8, and the experts' inputs quantised too (--fp8-experts w8a8)")
    p.add_argument("--host-batches", default=None,
                   help="batch sizes of the host-share section, e.g. 1,4,8 (default with --stages 1: "
                        f"{','.join(map(str, BATCHES))}; 0: skip it); needs --stages 1")
    p.add_argument("--host-steps", type=int, default=32, help="decode steps timed per batch size (host share)")
    add_run_ahead_args(p)  # (the host-share section times both orders either way)
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.set_defaults(run=run)


def _run_batch(engine, n: int, prompt_len: int, new: int, seed: int, temperature: float = 1.0
               ) -> tuple[float, list]:
    # Each batch its own prompts: a prompt seen before would start from its cached prefix (prefix reuse). Seeded
    # sampling at temperature 1, not greedy: greedy decoding of random weights falls into repeating one token, and
    # how many sequences of a step repeat the same token sets how many experts the step reads -- a code change
    # that moves a near-tie would change the work measured. Sampled tokens spread over the vocabulary instead.
    g = torch.Generator().manual_seed(seed)
    seqs = [engine.add(Prompt(torch.randint(1000, 100000, (prompt_len,), generator=g).tolist()),
                       SamplingParams(temperature=temperature, seed=seed * 1000 + i, max_new_tokens=new,
                                      stop_token_ids=()))
            for i in range(n)]
    t0 = time.perf_counter()
    engine.run_until_done()
    return time.perf_counter() - t0, seqs


def _phases(snaps: list[list[dict]]) -> list[dict]:
    """Per stage: busy seconds and steps of the warm-up (with compiling), the one-sequence run and the throughput
    run, from cumulative stats taken after each. A step's GPU time is read once its events have completed, so a
    phase's last steps may count in the next phase."""
    out = []
    for stage in range(len(snaps[-1])):
        row = {"stage": snaps[-1][stage]["stage"]}
        prev = {"busy_s": 0.0, "steps": 0}
        for name, snap in zip(("warmup", "single", "throughput"), snaps):
            cur = snap[stage] if stage < len(snap) else prev
            row[name] = {"busy_s": round(cur["busy_s"] - prev["busy_s"], 4), "steps": cur["steps"] - prev["steps"]}
            prev = cur
        out.append(row)
    return out


def _host_batches(args) -> tuple[int, ...]:
    """The host-share section's batch sizes; () to skip it."""
    if args.host_steps < 1:
        raise UserError(f"--host-steps {args.host_steps}: must be at least 1")
    if args.host_batches is None:
        return BATCHES if args.stages == 1 else ()
    try:
        sizes = tuple(int(x) for x in args.host_batches.split(","))
    except ValueError:
        raise UserError(f"--host-batches {args.host_batches!r}: expected batch sizes like 1,4,8") from None
    if sizes == (0,):
        return ()
    if any(b < 1 for b in sizes):
        raise UserError(f"--host-batches {args.host_batches!r}: batch sizes must be at least 1")
    if args.stages != 1:
        raise UserError("--host-batches: the host-share section times the stage in the driver's process; "
                        "run it with --stages 1")
    return sizes


def run(args) -> int:
    n_seq = args.sequences or 4 * args.stages
    batches = _host_batches(args)
    new = max(args.new_tokens, tokens_needed(args.host_steps) if batches else 0)
    if args.run_ahead is True and args.stages != 1:
        raise UserError(f"--run-ahead: needs --stages 1 (got {args.stages}); with several stages the micro-batch "
                        "groups already overlap the driver's work")
    opts = RunOptions(model=None, stages=args.stages, device=args.device,
                      dtype="bfloat16" if args.device == "cuda" else "float32", max_batch=max(n_seq, *batches, 1),
                      max_len=args.prompt_len + new + 8, quiet=True, random_preset=args.preset,
                      random_layers=args.layers, random_fp8=args.fp8 or args.w8a8,
                      fp8_experts="w8a8" if args.w8a8 else "keep", run_ahead=args.run_ahead)
    handle = start_engine(opts)
    try:
        engine = handle.engine
        run_ahead = engine.run_ahead
        # warm-up at the measured shapes (Triton, NCCL)
        _run_batch(engine, n_seq, args.prompt_len, 4, seed=1, temperature=args.temperature)
        snaps = [engine.executor.stage_stats()]
        _, (one,) = _run_batch(engine, 1, args.prompt_len, args.new_tokens, seed=2, temperature=args.temperature)
        per_token = (one.t_done - one.t_first_token) / (len(one.output) - 1)
        snaps.append(engine.executor.stage_stats())
        elapsed, seqs = _run_batch(engine, n_seq, args.prompt_len, args.new_tokens, seed=3,
                                   temperature=args.temperature)
        tokens = sum(len(s.output) for s in seqs)
        snaps.append(engine.executor.stage_stats())
        host = host_share(engine, batches, args.prompt_len, args.host_steps, args.temperature, seed=4)
    finally:
        handle.close()
    result = {
        "temperature": args.temperature,
        "run_ahead": run_ahead,  # the engine's order in the latency and throughput runs
        "fp8_experts": "w8a8" if args.w8a8 else args.fp8,
        "preset": args.preset, "layers": args.layers, "stages": args.stages, "plan": [list(r) for r in
                                                                                      handle.plan.layer_ranges],
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "single_sequence": {"prefill_ms": round((one.t_first_token - one.t_submit) * 1e3, 2),
                            "decode_ms_per_token": round(per_token * 1e3, 3),
                            "decode_ms_per_layer": round(per_token * 1e3 / args.layers, 4)},
        "throughput": {"sequences": n_seq, "new_tokens_each": args.new_tokens, "seconds": round(elapsed, 3),
                       "tokens_per_s": round(tokens / elapsed, 1),
                       "distinct_tokens": len({t for s in seqs for t in s.output}),
                       "outputs_digest": hashlib.sha256(json.dumps([s.output for s in seqs]).encode()).hexdigest()[:16]},
        "stage_busy_s": _phases(snaps),
    }
    if batches:
        result["host_share"] = host
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
