"""The stage runtime: one process's model (a range of layers), its KV block pool, and -- on the last stage -- the
sampler.

``StageRuntime.run`` takes the payload that arrives at this stage and returns what leaves it: hidden states for the
next stage, or the sampled tokens (last stage). With S = 1 the one stage is both first and last.

A stage of several tensor ranks (``group``, parallel/): its leader shares every step it runs with the other ranks
(payload, visual inputs included, by broadcast), so that all of them run the same step and meet in the same
all-reduces; the other ranks run what they receive (``pipeline.worker.follow_stage``) and drop their output: the
leader's is the stage's.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch

from ..model.batch import to_device
from ..model.kv_cache import KVCache
from ..model.qwen3_vl import Qwen3VLMoe
from ..parallel.group import StageGroup
from .host_phases import HostPhases
from .payload import StepPayload, TokenPayload, to_wire
from .transport import StageFailure


class Sampler(Protocol):
    """Per-sequence sampling state lives on the last stage (seeded generators, penalty counts), keyed by the
    engine's sequence id."""

    def start(self, seq_id: int, params: dict[str, Any], prompt_ids: list[int]) -> None: ...

    def extend(self, seq_id: int, prompt_ids: list[int]) -> None: ...

    def sample(self, seq_ids: list[int], logits: torch.Tensor) -> Any:
        """A draw: ``.tokens`` int64 [B] and ``.logprobs``, per row None or an object with ``logprob`` (float) and
        ``top`` ([(token id, logprob)])."""

    def release(self, seq_id: int) -> None: ...


class StageRuntime:
    def __init__(self, model: Qwen3VLMoe, cache: KVCache, sampler: Sampler | None, device: torch.device,
                 stage_index: int = 0, group: StageGroup | None = None):
        self.leads = group is None or group.is_leader  # its output leaves the stage
        if model.has_head and sampler is None and self.leads:
            raise ValueError("the last stage needs a sampler")
        self.group = group
        self.model = model
        self.cache = cache
        self.sampler = sampler
        self.device = torch.device(device)
        self.stage_index = stage_index
        self.busy_s = 0.0  # time spent computing steps (GPU time on CUDA)
        self.steps = 0
        self._timers: list[_GpuTimer] = []
        self.host_phases: HostPhases | None = None  # opt-in host timers (bench-pipeline), off by default

    def signal(self, kind: str) -> None:
        """A leader passes 'heartbeat' / 'stop' on to the stage's other ranks."""
        if self.group is not None and self.leads:
            try:
                self.group.share(StepPayload(kind=kind).header(), [])
            except RuntimeError as e:
                raise self._collective_failure(e) from None

    def run(self, p: StepPayload) -> StepPayload | TokenPayload | None:
        """The stage's output for step ``p`` (None on a tensor rank that does not lead the stage)."""
        t0 = time.perf_counter()
        timer = _GpuTimer(self.device) if self.device.type == "cuda" else None
        with torch.inference_mode():
            out = self._forward(p)
            if self.host_phases:
                self.host_phases.lap("launch")
            if not self.leads:
                result = None
            elif self.model.has_head:
                result = TokenPayload("tokens", p.mb, *self._sample(p, out))
            else:  # a copy: the stage may reuse its output buffer (CUDA-graph replay) while the send is in flight
                result = StepPayload("step", p.mb, p.step, p.layout, p.positions, p.input_ids, out.clone(),
                                     p.new_seqs, continued=p.continued, open_prompts=p.open_prompts,
                                     seq_ids=p.seq_ids, released=p.released)
        if timer is None:
            self.busy_s += time.perf_counter() - t0
        else:  # no host sync: the next stage's NCCL receive waits for this stream; read the events later
            timer.stop()
            self._timers.append(timer)
        self.steps += 1
        return result

    def _forward(self, p: StepPayload) -> torch.Tensor:
        """The stage's model on step ``p``; a leader first shares the step with the stage's other ranks."""
        try:
            if self.group is not None and self.leads:
                self.group.share(*to_wire(p, visual=True))
            return self.model(
                positions=to_device(p.positions, self.device),
                layout=p.layout,
                cache=self.cache,
                input_ids=to_device(p.input_ids, self.device) if self.model.has_embed else None,
                hidden=p.hidden.to(self.device, non_blocking=True) if p.hidden is not None else None,
                visual=p.visual.to(self.device) if p.visual is not None else None,
            )
        except RuntimeError as e:  # a collective whose peer died or hung (the backends raise plain RuntimeErrors)
            raise self._collective_failure(e) from None

    def _collective_failure(self, e: RuntimeError) -> Exception:
        """A StageFailure naming the stage's ranks for an error of one of its collectives; ``e`` itself otherwise."""
        msg = str(e).splitlines()[0] if str(e) else ""
        if self.group is None or not any(w in msg.lower() for w in ("gloo", "nccl", "timed out", "connection")):
            return e
        g = self.group
        return StageFailure(f"a collective of stage {g.stage} (ranks {g.ranks[0]}-{g.ranks[-1]}) failed: a tensor "
                            f"rank died or stopped answering; seen by {g.grid.label(g.ranks[g.tp_rank])} "
                            f"(rank {g.ranks[g.tp_rank]}) ({msg[:160]})")

    def stats(self) -> dict:
        while self._timers and self._timers[0].done():
            self.busy_s += self._timers.pop(0).seconds()
        return {"stage": self.stage_index, "busy_s": round(self.busy_s, 6), "steps": self.steps}

    def _sample(self, p: StepPayload, logits: torch.Tensor) -> tuple[torch.Tensor, list | None]:
        """Tokens [B] in layout order: sampled for decoding sequences and finished prompts, -1 for open prompts
        (a chunk short of the prompt's end, or a preempted sequence computed again: its logits row is dropped);
        and the log-probabilities of the rows that asked for them (TokenPayload.logprobs), or None when no row did."""
        if self.host_phases:
            self.host_phases.wait(self.device)
        for sid in p.released:
            self.sampler.release(sid)
        ids = p.input_ids.tolist()
        offsets = p.layout.offsets()
        for i, sid in enumerate(p.seq_ids):
            if sid in p.new_seqs:
                self.sampler.start(sid, p.new_seqs[sid], ids[offsets[i]:offsets[i + 1]])
            elif sid in p.continued:
                self.sampler.extend(sid, ids[offsets[i]:offsets[i + 1]])
        rows = [i for i, sid in enumerate(p.seq_ids) if sid not in p.open_prompts]
        tokens = torch.full((len(p.seq_ids),), -1, dtype=torch.long)
        logprobs: list | None = None
        if rows:
            drawn = self.sampler.sample([p.seq_ids[i] for i in rows],
                                        logits if len(rows) == len(p.seq_ids) else logits[rows])
            if self.host_phases:
                self.host_phases.lap("sample")
            tokens[rows] = drawn.tokens.cpu()
            if any(lp is not None for lp in drawn.logprobs):
                logprobs = [None] * len(p.seq_ids)
                for i, lp in zip(rows, drawn.logprobs):
                    logprobs[i] = None if lp is None else [lp.logprob, [list(t) for t in lp.top]]
        if self.host_phases:
            self.host_phases.lap("tokens")
        return tokens, logprobs


class _GpuTimer:
    """Elapsed GPU time of one step from CUDA events, read once the step has finished."""

    def __init__(self, device: torch.device):
        self.begin = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)
        self.begin.record(torch.cuda.current_stream(device))
        self.device = device

    def stop(self) -> None:
        self.end.record(torch.cuda.current_stream(self.device))

    def done(self) -> bool:
        return self.end.query()

    def seconds(self) -> float:
        return self.begin.elapsed_time(self.end) / 1000.0
