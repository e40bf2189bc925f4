"""``qwen-vl plan``: print the stage plan (layers, memory per stage, decode bytes per token) for a model and GPUs.

Exit status: 0 when the plan fits (or no budget was given); when a stage is over its budget the table is printed
first, then ``error: stage N (layers a-b) needs X GB > Y GB budget`` and exit code 2, like every other user error.
"""

from __future__ import annotations

import argparse

from ..model.config import PRESETS, ModelConfig, load_config, preset
from ..model.param_counts import WEIGHT_DTYPES
from ..parallel.grid import make_grid
from ..pipeline.plan import DEFAULT_MAX_BATCH, DEFAULT_MAX_SEQ_LEN, GB, StagePlan, format_gb, plan_stages
from .options import add_grid_args


def _number_list(kind: type, what: str):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None
    return parse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="show how the model splits into pipeline stages and what each needs",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="HF model directory (reads DIR/config.json)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="built-in config")
    p.add_argument("--stages", type=int, required=True, metavar="S",
                   help="number of pipeline stages (of --tensor-parallel-size GPUs each)")
    add_grid_args(p)
    p.add_argument("--gpu-mem", type=_number_list(float, "numbers"), metavar="GB[,GB...]",
                   help="memory budget of a GPU in decimal GB: one for every stage, or one per stage")
    p.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN, metavar="N",
                   help=f"tokens of context per sequence (default {DEFAULT_MAX_SEQ_LEN})")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="B",
                   help=f"sequences with a KV-cache slot (default {DEFAULT_MAX_BATCH})")
    p.add_argument("--prefill-chunk", type=int, metavar="N",
                   help="prompt tokens per step (default: max-seq-len up to 8192; longer prompts go in chunks)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES,
                   help="weights: default fp8 for an fp8-quantised model, fp32 for a float32 one, else bf16")
    p.add_argument("--layers-per-stage", type=_number_list(int, "integers"), metavar="A,B,...",
                   help="fix the number of decoder layers per stage instead of balancing")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=run)


def default_dtype(cfg: ModelConfig) -> str:
    if cfg.quantization is not None and cfg.quantization.quant_method == "fp8":
        return "fp8"
    return "fp32" if cfg.torch_dtype == "float32" else "bf16"


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.model) if args.model else preset(args.preset)
    gpu_mem = args.gpu_mem[0] if args.gpu_mem and len(args.gpu_mem) == 1 else args.gpu_mem
    dtype = args.dtype or default_dtype(cfg)
    grid = make_grid(cfg, args.stages, args.tp, args.moe_parallel, fp8=dtype == "fp8")
    plan = plan_stages(cfg, args.stages, layers_per_stage=args.layers_per_stage, gpu_mem_gb=gpu_mem,
                       max_seq_len=args.max_seq_len, max_batch=args.max_batch, dtype=dtype,
                       prefill_chunk=args.prefill_chunk, require_fit=False, tp=grid.tp, moe=grid.moe)
    name = args.model or args.preset
    print(plan.to_json() if args.json else "\n".join(format_plan(plan, name)), flush=True)
    plan.check_fits()
    return 0


# --------------------------------------------------------------------------------------------------------------------
# Table

_HEADER = ("stage", "layers", "holds", "weights GB", "KV GB", "act GB", "total GB", "budget GB", "fits",
           "decode GB/token")
_LEFT = {"layers", "holds", "fits"}


def _fits_label(fits: bool | None) -> str:
    return "-" if fits is None else ("yes" if fits else "NO")


def _budget_label(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GB:g}"


def _rows(plan: StagePlan) -> list[tuple[str, ...]]:
    rows = [(str(s.index), s.layers_label, s.holds_label, format_gb(s.weights_bytes), format_gb(s.kv_bytes),
             format_gb(s.act_bytes), format_gb(s.total_bytes), _budget_label(s.budget_bytes), _fits_label(s.fits),
             f"{s.decode_bytes / GB:.2f}") for s in plan.stages]
    st, n = plan.stages, plan.tp  # the total row: every GPU of the grid
    budgets = [s.budget_bytes for s in st]
    rows.append(("total", f"0-{plan.num_layers - 1}", "", format_gb(n * sum(s.weights_bytes for s in st)),
                 format_gb(n * sum(s.kv_bytes for s in st)), format_gb(n * sum(s.act_bytes for s in st)),
                 format_gb(n * sum(s.total_bytes for s in st)),
                 _budget_label(None if None in budgets else n * sum(budgets)),
                 _fits_label(plan.fits), f"{n * sum(s.decode_bytes for s in st) / GB:.2f}"))
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
             f"max-seq-len {plan.max_seq_len}, max-batch {plan.max_batch}, prefill-chunk {plan.prefill_chunk}, "
             f"{'balanced' if plan.balanced else 'fixed'} split, fingerprint {plan.fingerprint()}")
    lines = [title]
    if plan.tp > 1:
        lines.append(f"grid: {n} stage{'s' if n > 1 else ''} x {plan.tp} tensor ranks = {n * plan.tp} GPUs, "
                     f"experts split {'by expert' if plan.moe == 'ep' else 'by width'} ({plan.moe}); a stage's "
                     f"figures are per GPU, the total row is all GPUs'")
    return lines + [line(r) for r in rows]
