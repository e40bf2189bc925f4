"""THE key map: checkpoint key -> model parameter. The only place that knows how stored tensors become parameters.

Every parameter not named in ``KEY_MAP`` is stored under its own name with its own shape (the model's parameter names
are the HF transformers-5.x keys). Only the fused MoE experts have several spellings on disk:

- ``hf``         transformers 5.x ``save_pretrained``: ``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]
                 (the in-memory orientation; loaded as is);
- ``released``   the official Qwen checkpoints: [E, H, 2I] and [E, I, H] (input-major; loaded transposed in dims 1, 2);
- ``per-expert`` ``experts.{e}.gate_proj.weight`` [I, H], ``up_proj.weight`` [I, H], ``down_proj.weight`` [H, I]
                 (nn.Linear layout, as in FP8 releases); gate rows go first in ``gate_up_proj[e]``, then up rows.

The layout is decided per decoder layer from the stored shapes (``detect_expert_layout``), never guessed.

A config with ``tie_word_embeddings`` stores no ``lm_head.weight`` (transformers' save_pretrained drops it): the
stage holding the head reads the embedding matrix into its own lm_head (``TIED_HEAD``).

Run ``python -m qwen_vl_distributed.checkpoint.keymap`` to print the table that docs/weight_mapping.md embeds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

from .errors import LayoutError, ShapeMismatchError
from .spec import EMBED, LAYER, LM_HEAD, Shape

EXPERTS = LAYER + "mlp.experts."
GATE_UP = EXPERTS + "gate_up_proj"
DOWN = EXPERTS + "down_proj"

LAYOUTS = {
    "hf": "fused, transformers 5.x save_pretrained orientation (= in-memory)",
    "released": "fused, official Qwen release orientation (input-major)",
    "per-expert": "one nn.Linear-style weight per expert and projection",
}
FUSED_LAYOUTS = ("hf", "released")

# Where a stored tensor lands in its parameter. I = rows of one projection = gate_up_proj.shape[1] // 2.
PLACES = {
    "whole": "the whole parameter, as stored",
    "whole, transposed(1, 2)": "the whole parameter, stored with its last two dims swapped",
    "[e, :I]": "gate rows of expert e",
    "[e, I:]": "up rows of expert e",
    "[e]": "expert e",
}


@dataclass(frozen=True)
class Rule:
    param: str    # parameter name pattern ({i}: global decoder layer)
    layout: str   # expert layout the rule belongs to (see LAYOUTS)
    key: str      # checkpoint key pattern ({i}; {e}: expert index)
    stored: str   # stored shape, in symbols (documentation; the code derives shapes from the parameter)
    place: str    # one of PLACES


KEY_MAP: tuple[Rule, ...] = (
    Rule(GATE_UP, "hf", GATE_UP, "[E, 2I, H]", "whole"),
    Rule(GATE_UP, "released", GATE_UP, "[E, H, 2I]", "whole, transposed(1, 2)"),
    Rule(GATE_UP, "per-expert", EXPERTS + "{e}.gate_proj.weight", "[I, H]", "[e, :I]"),
    Rule(GATE_UP, "per-expert", EXPERTS + "{e}.up_proj.weight", "[I, H]", "[e, I:]"),
    Rule(DOWN, "hf", DOWN, "[E, H, I]", "whole"),
    Rule(DOWN, "released", DOWN, "[E, I, H]", "whole, transposed(1, 2)"),
    Rule(DOWN, "per-expert", EXPERTS + "{e}.down_proj.weight", "[H, I]", "[e]"),
)

# tie_word_embeddings: the head is the embedding matrix, in whichever stage holds the head
TIED_HEAD = Rule(LM_HEAD, "tied", EMBED, "[V, H]", "whole")

_PARAM_RES = {p: re.compile("^" + re.escape(p).replace(r"\{i\}", r"(\d+)") + "$") for p in {r.param for r in KEY_MAP}}
_PER_EXPERT_RE = re.compile(r"^model\.language_model\.layers\.(\d+)\.mlp\.experts\.\d+\.")


@dataclass(frozen=True)
class Piece:
    """One stored tensor and where it goes: ``param[index]`` (transposed in dims 1, 2 first if ``transpose``)."""

    param: str
    key: str
    index: tuple           # index into the parameter; () for the whole parameter
    transpose: bool
    stored_shape: Shape    # the shape the stored tensor must have


def _mapped(param: str) -> tuple[str, int] | None:
    """(pattern, layer) if ``param`` is one of the table's parameters."""
    for pattern, rx in _PARAM_RES.items():
        m = rx.match(param)
        if m:
            return pattern, int(m.group(1))
    return None


def _index(place: str, e: int, rows: int) -> tuple:
    return {"whole": (), "whole, transposed(1, 2)": (), "[e, :I]": (e, slice(0, rows)),
            "[e, I:]": (e, slice(rows, 2 * rows)), "[e]": (e,)}[place]


def _piece(param: str, shape: Shape, rule: Rule, i: int, e: int) -> Piece:
    transpose = rule.place.startswith("whole, transposed")
    rows = shape[1] // 2 if len(shape) == 3 else 0
    index = _index(rule.place, e, rows)
    if transpose:
        stored = (*shape[:-2], shape[-1], shape[-2])
    else:
        stored = _sliced_shape(shape, index)
    return Piece(param, rule.key.format(i=i, e=e), index, transpose, stored)


def _sliced_shape(shape: Shape, index: tuple) -> Shape:
    out = list(shape)
    for d, ix in enumerate(index):
        out[d] = len(range(*ix.indices(shape[d]))) if isinstance(ix, slice) else None
    return tuple(s for s in out if s is not None)


def pieces(param: str, shape: Shape, layout: str | None, tied: bool = False) -> list[Piece]:
    """The stored tensors that make up ``param`` (whose shape is ``shape``) under expert ``layout``; ``tied``: the
    config ties the word embeddings."""
    if tied and param == TIED_HEAD.param:
        return [Piece(param, TIED_HEAD.key, (), False, tuple(shape))]
    hit = _mapped(param)
    if hit is None:
        return [Piece(param, param, (), False, tuple(shape))]
    pattern, i = hit
    rules = [r for r in KEY_MAP if r.param == pattern and r.layout == layout]
    per_expert = any("{e}" in r.key for r in rules)
    experts = range(shape[0]) if per_expert else range(1)
    # per expert, gate before up before down (the order the shards usually hold them)
    return [_piece(param, shape, r, i, e) for e in experts for r in rules]


def expert_layer(key: str) -> int | None:
    """Layer index if ``key`` is an expert tensor in any layout, else None."""
    m = _PER_EXPERT_RE.match(key)
    if m:
        return int(m.group(1))
    hit = _mapped(key)
    return hit[1] if hit else None


def detect_expert_layout(i: int, keys: Mapping[str, Shape], shapes: Mapping[str, Shape],
                         where: Callable[[str], str]) -> str:
    """Expert layout of decoder layer ``i``.

    ``keys``: stored key -> shape for this layer's expert tensors; ``shapes``: expected parameter shapes of
    ``gate_up_proj`` / ``down_proj`` of the layer; ``where(key)`` names the file of a key for messages.
    Fused tensors are oriented by the shapes of gate_up_proj AND down_proj together, so H == 2I (gate_up alone
    ambiguous) is still decided by down_proj; shapes that fit both orientations or neither are errors.
    """
    fused = [k for k in keys if _mapped(k)]
    split = [k for k in keys if _PER_EXPERT_RE.match(k)]
    if fused and split:
        raise LayoutError(f"layer {i} stores experts both fused ({fused[0]} in {where(fused[0])}) and per expert "
                          f"({split[0]} in {where(split[0])})")
    if split:
        return "per-expert"
    if not fused:
        return "hf"  # nothing stored: missing-key errors will name the hf keys
    fits = [lay for lay in FUSED_LAYOUTS if all(
        p.key not in keys or keys[p.key] == p.stored_shape
        for param, shape in shapes.items() for p in pieces(param, shape, lay))]
    if len(fits) == 1:
        return fits[0]
    if fits and any(p.key not in keys for param, shape in shapes.items() for p in pieces(param, shape, "hf")):
        return "hf"  # one fused tensor missing: let the missing-key error speak rather than call it ambiguous
    found = ", ".join(f"{k} {list(keys[k])} in {where(k)}" for k in sorted(fused))
    if not fits:
        want = "; ".join(f"{lay}: " + ", ".join(f"{p.key.rsplit('.', 1)[1]} {list(p.stored_shape)}"
                                               for param, shape in shapes.items() for p in pieces(param, shape, lay))
                         for lay in FUSED_LAYOUTS)
        raise ShapeMismatchError(f"shape mismatch: fused experts of layer {i} fit no known orientation: found {found}; "
                                 f"expected {want}")
    raise LayoutError(f"expert orientation of layer {i} is ambiguous: {found} fits both "
                      f"{' and '.join(fits)} orientations for this config")


def markdown_table() -> str:
    """The key map as a markdown table (embedded verbatim in docs/weight_mapping.md)."""
    lines = ["| parameter | layout | checkpoint key | stored shape | lands in |", "|---|---|---|---|---|"]
    for r in KEY_MAP + (TIED_HEAD,):
        lines.append(f"| `{r.param}` | {r.layout} | `{r.key}` | {r.stored} | {r.place} |")
    lines.append("| any other parameter `P` | all | `P` (same name) | parameter shape | whole |")
    return "\n".join(lines)


def params_table(preset_name: str = "235b-a22b") -> str:
    """Every parameter family with its shape for a preset (layer 0 / block 0 / merger 0 stand for all)."""
    from ..model.config import preset
    from .spec import param_shapes

    collapse = ((r"\.layers\.(\d+)\.", ".layers.{i}."), (r"\.blocks\.(\d+)\.", ".blocks.{j}."),
                (r"\.deepstack_merger_list\.(\d+)\.", ".deepstack_merger_list.{k}."))
    lines = [f"| parameter ({preset_name}) | shape |", "|---|---|"]
    for name, shape in param_shapes(preset(preset_name)).items():
        for rx, repl in collapse:
            m = re.search(rx, name)
            if m:
                if m.group(1) != "0":
                    break
                name = re.sub(rx, repl, name)
        else:
            lines.append(f"| `{name}` | {list(shape)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
    print()
    print(params_table())
