"""What crosses a stage boundary: one typed payload per step, and the sampled tokens going back to stage 0.

StepPayload (stage s -> stage s+1), for T packed tokens of B sequences:
  kind        "step" | "heartbeat" | "stop"
  mb          micro-batch id (sequences are grouped; one step per group in flight)
  step        running step counter (diagnostics)
  layout      SeqLayout: per sequence its KV block table, cached length before the step, new-token count (the
              tables travel as one int32 message beside the header, not as JSON)
  seq_ids     [B] the engine's id of each sequence (the last stage's sampler keeps its state by it)
  positions   [3, T] int64  M-RoPE positions
  input_ids   [T] int64     the step's token ids (the last stage uses them for repetition penalties)
  hidden      [T, H] model dtype; absent on the way into stage 0
  new_seqs    {seq id: {"params": SamplingParams.wire(), and where needed "history_prefix" (prompt tokens taken
              from the prefix cache, which penalties count) and "stop_ids" (banned until min_tokens)}} for sequences
              whose first step this is (the last stage starts their sampler state); JSON-serialisable
  continued   seq ids whose rows continue a prompt begun in an earlier step (chunked prefill: the sampler adds
              these prompt tokens to the sequence's history)
  open_prompts  seq ids whose rows are not sampled: a prompt not finished after this step, or a preempted
              sequence's tokens being computed again
  released    seq ids that ended (finished, aborted): the last stage drops their sampler state
  ids_from    (step, rows) or None: a step run ahead (one stage of one rank only, never on the wire) takes its
              input ids on the device from the tokens that step ``step`` sampled, row ``rows[i]`` for its row i;
              ``input_ids`` then holds placeholders
  visual      images/videos of the step (stage 0 only: DeepStack layers live there, so visual data never crosses)
TokenPayload (last stage -> stage 0): mb, tokens [B] int64 in layout order (-1 for open prompts), logprobs (None,
or per row None or [logprob of the sampled token, [[token id, logprob], ...] the most likely first]; JSON), and
every stage's busy-time stats.

On the wire (``to_wire`` / ``from_wire``) a StepPayload is a JSON-able header (everything small, the token ids and
positions included) and the tensors it announces: the block tables (one flat int32 tensor; between stages it
travels on the control channel), hidden, and -- only within stage 0's tensor-parallel group, which shares the step
the driver made -- the step's pixels and visual masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..model.batch import SeqLayout
from ..model.qwen3_vl import VisualInputs


@dataclass
class StepPayload:
    kind: str
    mb: int = -1
    step: int = -1
    layout: SeqLayout | None = None
    positions: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    new_seqs: dict[int, dict[str, Any]] = field(default_factory=dict)
    visual: VisualInputs | None = None
    stats: list[dict[str, Any]] = field(default_factory=list)  # each stage appends its busy time (JSON)
    continued: list[int] = field(default_factory=list)
    open_prompts: list[int] = field(default_factory=list)
    seq_ids: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    ids_from: tuple[int, list[int]] | None = None

    def header(self) -> dict[str, Any]:
        """The small JSON part of the payload (everything but the tensors and the block tables)."""
        h: dict[str, Any] = {"kind": self.kind, "mb": self.mb, "step": self.step, "stats": self.stats}
        if self.layout is not None:
            h.update(seq_ids=self.seq_ids, starts=self.layout.starts, lens=self.layout.lens,
                     table_lens=[len(t) for t in self.layout.block_tables],
                     new_seqs={str(k): v for k, v in self.new_seqs.items()}, continued=self.continued,
                     open_prompts=self.open_prompts, released=self.released,
                     hidden=list(self.hidden.shape) if self.hidden is not None else None,
                     dtype=_dtype_name(self.hidden) if self.hidden is not None else None)
        return h

    @staticmethod
    def control(kind: str) -> "StepPayload":
        return StepPayload(kind=kind)


@dataclass
class TokenPayload:
    kind: str
    mb: int = -1
    tokens: torch.Tensor | None = None  # [B] int64
    logprobs: Any = None  # per row: None or [logprob, [[id, logprob], ...]]; None when no row asked (run-ahead:
    # a callable giving that list, until ``settle``)
    stats: list[dict[str, Any]] = field(default_factory=list)  # per-stage busy time, stage order
    ready: Any = None  # a CUDA event recorded after the tokens' copy to the host was queued (run-ahead), or None

    def settle(self) -> "TokenPayload":
        """Wait for the tokens' (and log-probabilities') copy to the host, if one is queued, and read the
        log-probabilities into their lists: a step run ahead leaves both for the collector."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        if callable(self.logprobs):
            self.logprobs = self.logprobs()
        return self


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


_VISUAL_TENSORS = ("pixel_values", "pixel_values_videos", "image_mask", "video_mask")


def on_host_plane(dtype: torch.dtype) -> bool:
    """Whether a tensor of the wire form travels with the header on the host (gloo) plane rather than the data one:
    the block tables, its one int32 tensor, which the receiver reads at once without waiting for a GPU."""
    return dtype == torch.int32


def to_wire(p: StepPayload, visual: bool = False) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """(header, tensors): for a step, the block tables flat in one int32 host tensor (``header["table_lens"]``
    cuts it), then hidden if present, then with ``visual`` the step's image / video tensors."""
    if p.ids_from is not None:
        raise ValueError("a step run ahead takes its input ids from the device: it cannot cross a process")
    h = p.header()
    tensors = []
    if p.layout is None:
        return h, tensors
    h["ids"] = p.input_ids.tolist()
    h["pos"] = p.positions.tolist()
    tensors.append(torch.tensor([b for t in p.layout.block_tables for b in t], dtype=torch.int32))
    if p.hidden is not None:
        tensors.append(p.hidden)
    if visual and p.visual is not None:
        v = p.visual
        present = [(name, getattr(v, name)) for name in _VISUAL_TENSORS if getattr(v, name) is not None]
        h["visual"] = {"image_grid_thw": v.image_grid_thw, "video_grid_thw": v.video_grid_thw,
                       "tensors": [[name, list(t.shape), _dtype_name(t)] for name, t in present]}
        tensors += [t for _, t in present]
    return h, tensors


def from_wire(h: dict[str, Any], take: Callable[[tuple[int, ...], torch.dtype], torch.Tensor]) -> StepPayload:
    """The payload of a header; ``take(shape, dtype)`` gives the next announced tensor (``to_wire``'s order)."""
    if h["kind"] != "step":
        return StepPayload(kind=h["kind"], stats=h["stats"])
    flat = take((sum(h["table_lens"]),), torch.int32)
    tables = [t.tolist() for t in flat.cpu().split(h["table_lens"])]
    hidden = take(tuple(h["hidden"]), getattr(torch, h["dtype"])) if h["hidden"] is not None else None
    visual = None
    if h.get("visual"):
        v = h["visual"]
        grids = {k: [tuple(g) for g in v[k]] if v[k] else None for k in ("image_grid_thw", "video_grid_thw")}
        visual = VisualInputs(**grids, **{name: take(tuple(shape), getattr(torch, dtype))
                                          for name, shape, dtype in v["tensors"]})
    new = {int(k): val for k, val in h["new_seqs"].items()}
    return StepPayload("step", h["mb"], h["step"], SeqLayout(tables, h["starts"], h["lens"]),
                       torch.tensor(h["pos"], dtype=torch.long), torch.tensor(h["ids"], dtype=torch.long), hidden,
                       new, visual, stats=h["stats"], continued=h["continued"], open_prompts=h["open_prompts"],
                       seq_ids=h["seq_ids"], released=h["released"])
