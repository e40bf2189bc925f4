"""Describe a checkpoint from its config, index and shard headers alone (no tensor data is read).

Runs in seconds on a full 235B checkpoint: ~100 shard headers of a few hundred KB at most. What each pipeline stage
holds is given by the caller (a stage plan's parts), never planned here.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from .errors import MissingKeyError, UnexpectedKeyError
from .index import Checkpoint, open_checkpoint
from .matching import plan_load
from .safetensors_io import FP8_DTYPES
from .spec import StageParts, param_shapes

SHOW = 5  # names listed per category


@dataclass(frozen=True)
class _Totals:
    params: int
    bytes_by_dtype: dict[str, int]
    tensors: int


def _totals(infos: list) -> _Totals:
    by_dtype: Counter = Counter()
    for info in infos:
        by_dtype[info.dtype] += info.nbytes
    params = sum(i.numel for i in infos if not i.name.endswith("_scale_inv"))  # fp8 scales are not parameters
    return _Totals(params, dict(sorted(by_dtype.items())), len(infos))


def _architecture(ckpt: Checkpoint) -> str:
    with open(ckpt.config_path, encoding="utf-8") as f:
        d = json.load(f)
    return ", ".join(d.get("architectures") or []) or str(d.get("model_type"))


def _whole_model(ckpt: Checkpoint):
    """The whole model (all layers, vision, embed, head) matched against the checkpoint; problems collected."""
    parts = StageParts((0, ckpt.cfg.text.num_hidden_layers), True, True, True)
    return plan_load(ckpt, param_shapes(ckpt.cfg), parts, "the whole model")


def _coverage(ckpt: Checkpoint) -> dict:
    """Count, don't raise."""
    plan = _whole_model(ckpt)
    other = [p for p in plan.problems if not isinstance(p, (MissingKeyError, UnexpectedKeyError))]
    return {
        "expected_params": sum(math.prod(s) for s in plan.params.values()),
        "missing": len(plan.missing), "missing_first": plan.missing[:SHOW],
        "unexpected": len(plan.unexpected), "unexpected_first": plan.unexpected[:SHOW],
        "problems": len(other), "problems_first": [str(p) for p in other[:SHOW]],
        "expert_layouts": dict(sorted(Counter(plan.layouts.values()).items())),
    }


def _stages(infos: list, stages: Sequence[StageParts]) -> list[dict]:
    out = []
    for k, parts in enumerate(stages):
        mine = [i for i in infos if parts.owns(i.name)]
        out.append({"stage": k, "holds": parts.describe(), "tensors": len(mine),
                    "bytes": sum(i.nbytes for i in mine), "files": len({i.file for i in mine})})
    return out


def transformers_misreads(ckpt: Checkpoint) -> str | None:
    """Why transformers would read this checkpoint's tensors other than as stored while its load report stays
    clean, or None. It orients a fused expert tensor by that tensor's shape alone (transposing unless it already
    has the in-memory shape), and a release-orientation gate_up_proj [E, H, 2I] has the in-memory shape [E, 2I, H]
    when H = 2I."""
    t = ckpt.cfg.text
    if t.hidden_size != 2 * t.moe_intermediate_size or "released" not in _whole_model(ckpt).layouts.values():
        return None
    return (f"transformers orients a fused gate_up_proj by its shape alone, and with hidden_size {t.hidden_size} = "
            f"2 x moe_intermediate_size it would read this checkpoint's release-orientation experts untransposed")


def inspect_checkpoint(directory: str | os.PathLike, stages: Sequence[StageParts] | None = None) -> dict:
    """A JSON-able summary of a checkpoint directory: headers only. ``stages``: what each pipeline stage holds (e.g.
    a stage plan's); None: one stage holding everything."""
    ckpt = open_checkpoint(directory)
    infos = [ckpt.info(k) for k in ckpt.weight_map]
    totals = _totals(infos)
    cfg = ckpt.cfg
    return {
        "directory": os.fspath(directory),
        "architecture": _architecture(ckpt),
        "dtype": cfg.torch_dtype,
        "layers": cfg.text.num_hidden_layers,
        "experts": cfg.text.num_experts,
        "shards": len(ckpt.files()),
        "tensors": totals.tensors,
        "params": totals.params,
        "bytes": sum(totals.bytes_by_dtype.values()),
        "bytes_by_dtype": totals.bytes_by_dtype,
        "fp8": any(i.dtype in FP8_DTYPES for i in infos),
        "quantization": cfg.quantization.quant_method if cfg.quantization else None,
        "coverage": _coverage(ckpt),
        "stages": _stages(infos, stages or [StageParts((0, cfg.text.num_hidden_layers), True, True, True)]),
    }


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def format_report(r: dict) -> str:
    """Human-readable form of inspect_checkpoint's result."""
    c = r["coverage"]
    lines = [
        f"checkpoint   {r['directory']}",
        f"architecture {r['architecture']} ({r['layers']} layers, {r['experts']} experts, dtype {r['dtype']})",
        f"tensors      {r['tensors']} in {r['shards']} shard(s), {_gb(r['bytes'])}",
        f"parameters   {r['params']:,} (config implies {c['expected_params']:,})",
        "by dtype     " + ", ".join(f"{d} {_gb(n)}" for d, n in r["bytes_by_dtype"].items()),
        f"fp8          {'yes' if r['fp8'] else 'no'} (quantization_config: {r['quantization'] or 'none'})",
        "experts      " + (", ".join(f"{lay} ({n} layers)" for lay, n in c["expert_layouts"].items()) or "none"),
        f"missing      {c['missing']}" + (f": {', '.join(c['missing_first'])}" if c["missing"] else ""),
        f"unexpected   {c['unexpected']}" + (f": {', '.join(c['unexpected_first'])}" if c["unexpected"] else ""),
    ]
    if c["problems"]:
        lines.append(f"problems     {c['problems']}:")
        lines += [f"  {p}" for p in c["problems_first"]]
    lines.append("stages")
    for s in r["stages"]:
        lines.append(f"  {s['stage']:>3}  {s['holds']:<34} {s['tensors']:>6} tensors  {_gb(s['bytes']):>10}  "
                     f"{s['files']} shard(s)")
    return "\n".join(lines)
