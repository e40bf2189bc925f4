"""``qwen-vl plan``: print the stage plan (layers, memory per stage, decode bytes per token) for a model and GPUs.

The plan is the one ``serve`` and ``generate`` compute with the same options (the same arguments, defaults and
function), so ``qwen-vl plan --model DIR --stages 4 --device cuda`` shows what ``qwen-vl serve --model DIR --stages
4 --device cuda`` will load. ``--fp8-experts auto`` decides by this machine's GPUs: to plan an fp8 checkpoint for
another machine, say ``keep``. ``--preset NAME`` plans a built-in config without a checkpoint (with ``--fp8-experts
keep`` or ``w8a8``: as its fp8 release).

Exit status: 0 when the plan fits (or no budget was given); when a stage is over its budget the table is printed
first, then ``error: stage N (layers a-b) needs X GB > Y GB budget`` and exit code 2, like every other user error.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..engine.build import make_plan
from ..errors import UserError
from ..model.config import PRESETS, QuantizationConfig, load_config, preset
from ..pipeline.plan import GB, StagePlan, format_gb
from .options import add_model_args, add_plan_args, model_source, run_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="show how the model splits into pipeline stages and what each needs",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    add_model_args(p, model_group=src, required=False)
    src.add_argument("--preset", choices=sorted(PRESETS), help="a built-in config instead of a checkpoint")
    add_plan_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=run)


def _config(args: argparse.Namespace):
    """(config, model source or None, the name to show)."""
    if args.preset is None:
        source = model_source(args)
        return load_config(source.path), source, source.name
    if args.revision is not None or args.download:
        raise UserError("--revision and --download go with --model")
    cfg = preset(args.preset)
    if args.fp8_experts in ("keep", "w8a8"):
        cfg = dataclasses.replace(cfg, quantization=QuantizationConfig())
    return cfg, None, args.preset


def run(args: argparse.Namespace) -> int:
    cfg, source, name = _config(args)
    plan = make_plan(cfg, run_options(args, source), require_fit=False)
    print(plan.to_json() if args.json else "\n".join(format_plan(plan, name)), flush=True)
    plan.check_fits()
    return 0


# --------------------------------------------------------------------------------------------------------------------
# Table

_HEADER = ("stage", "layers", "holds", "weights GB", "KV GB", "act GB", "total GB", "budget GB", "fits",
           "KV room tokens", "decode GB/token")
_LEFT = {"layers", "holds", "fits"}


def _fits_label(fits: bool | None) -> str:
    return "-" if fits is None else ("yes" if fits else "NO")


def _budget_label(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GB:g}"


def _tokens_label(tokens: int | None) -> str:
    return "-" if tokens is None else str(tokens)


def _rows(plan: StagePlan) -> list[tuple[str, ...]]:
    rows = [(str(s.index), s.layers_label, s.holds_label, format_gb(s.weights_bytes), format_gb(s.kv_bytes),
             format_gb(s.act_bytes), format_gb(s.total_bytes), _budget_label(s.budget_bytes), _fits_label(s.fits),
             _tokens_label(s.kv_capacity_tokens), f"{s.decode_bytes / GB:.2f}") for s in plan.stages]
    st, n = plan.stages, plan.tp  # the total row: every GPU of the grid
    budgets = [s.budget_bytes for s in st]
    rows.append(("total", f"0-{plan.num_layers - 1}", "", format_gb(n * sum(s.weights_bytes for s in st)),
                 format_gb(n * sum(s.kv_bytes for s in st)), format_gb(n * sum(s.act_bytes for s in st)),
                 format_gb(n * sum(s.total_bytes for s in st)),
                 _budget_label(None if None in budgets else n * sum(budgets)),
                 _fits_label(plan.fits), "", f"{n * sum(s.decode_bytes for s in st) / GB:.2f}"))
    return rows


def format_plan(plan: StagePlan, model_name: str) -> list[str]:
    """Header line, one row per stage, a totals row. GB are decimal and rounded up to 0.1."""
    rows = [_HEADER] + _rows(plan)
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADER))]

    def line(row: tuple[str, ...]) -> str:
        cells = [c.ljust(w) if h in _LEFT else c.rjust(w) for c, w, h in zip(row, widths, _HEADER)]
        return "  ".join(cells).rstrip()

    n = len(plan.stages)
    title = (f"{model_name}: {n} stage{'s' if n > 1 else ''}, {plan.num_layers} decoder layers, dtype {plan.dtype}, "
             f"max-len {plan.max_seq_len}, max-batch {plan.max_batch}, prefill-chunk {plan.prefill_chunk}, "
             f"{'balanced' if plan.balanced else 'fixed'} split, fingerprint {plan.fingerprint()}")
    kv = (f"KV cache: {plan.max_total_tokens} tokens on every stage ({plan.kv_blocks} blocks of "
          f"{plan.kv_block_size}); sequences of 32k tokens at once: {plan.sequences_of(32768)}")
    lines = [title]
    if plan.tp > 1:
        lines.append(f"grid: {n} stage{'s' if n > 1 else ''} x {plan.tp} tensor ranks = "
                     f"{n * plan.tp} GPUs, experts split {'by expert' if plan.moe == 'ep' else 'by width'} "
                     f"({plan.moe}); a stage's figures are per GPU (its KV: the kv heads it holds), the total row is "
                     "all GPUs'")
    return lines + [line(r) for r in rows] + [kv]
