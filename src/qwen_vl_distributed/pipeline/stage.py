"""The stage runtime: one process's model (a range of layers), its KV block pool, and -- on the last stage -- the
sampler.

``StageRuntime.run`` takes the payload that arrives at this stage and returns what leaves it: hidden states for the
next stage, or the sampled tokens (last stage). With S = 1 the one stage is both first and last.

A stage of several tensor ranks (``group``, parallel/): its leader shares every step it runs with the other ranks
(payload, visual inputs included, by broadcast), so that all of them run the same step and meet in the same
all-reduces; the other ranks run what they receive (``pipeline.worker.follow_stage``) and drop their output: the
leader's is the stage's.

Running ahead (one stage of one rank, ``defer_tokens``): the sampled tokens stay on the device for the next step,
which the driver may submit before it reads them (``StepPayload.ids_from`` names the rows it takes as input ids),
and their copy to the host is queued behind the step, with an event the executor waits on when the driver collects.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch

from ..model.batch import list_to_device, to_device, to_host_queued
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
        """A draw: ``.tokens`` int64 [B]; ``.logprobs``, per row None or an object with ``logprob`` (float) and
        ``top`` ([(token id, logprob)]); and ``.pending``, the same log-probabilities not yet read from the device
        (``engine.sampling.PendingLogprobs``: ``to_host``, ``lists``), None where no row asked for any."""

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
        self.defer_tokens = False  # run-ahead: leave the tokens on the device, copy them back behind the step
        self._last_tokens: tuple[int, torch.Tensor] | None = None  # (step, its tokens on the device) when deferring

    @property
    def can_run_ahead(self) -> bool:
        """Whether a step may take its input ids from the previous step's tokens on the device: the one stage
        (embedding and sampler in this process) of one rank (no other rank that would need the ids)."""
        return self.group is None and self.model.has_embed and self.model.has_head

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
                tokens, logprobs, ready = self._sample(p, out)
                result = TokenPayload("tokens", p.mb, tokens, logprobs, ready=ready)
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
                input_ids=self._input_ids(p) if self.model.has_embed else None,
                hidden=p.hidden.to(self.device, non_blocking=True) if p.hidden is not None else None,
                visual=p.visual.to(self.device) if p.visual is not None else None,
            )
        except RuntimeError as e:  # a collective whose peer died or hung (the backends raise plain RuntimeErrors)
            raise self._collective_failure(e) from None

    def _input_ids(self, p: StepPayload) -> torch.Tensor:
        """The step's token ids on the device: the payload's, or for a step run ahead the rows of the previous
        step's tokens it names (never read back to the host)."""
        if p.ids_from is None:
            return to_device(p.input_ids, self.device)
        step, rows = p.ids_from
        if self._last_tokens is None or self._last_tokens[0] != step:
            have = None if self._last_tokens is None else self._last_tokens[0]
            raise RuntimeError(f"step {p.step} runs ahead of step {step}, but the stage holds the tokens of {have}")
        return self._last_tokens[1][list_to_device(rows, self.device)]

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

    def _sample(self, p: StepPayload, logits: torch.Tensor) -> tuple[torch.Tensor, list | None, object]:
        """Tokens [B] in layout order: sampled for decoding sequences and finished prompts, -1 for open prompts
        (a chunk short of the prompt's end, or a preempted sequence computed again: its logits row is dropped);
        the log-probabilities of the rows that asked for them (TokenPayload.logprobs), or None when no row did;
        and, with ``defer_tokens`` on a GPU, the event after which the host tokens may be read (else None)."""
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
        every = len(rows) == len(p.seq_ids)
        where = logits.device if self.defer_tokens else torch.device("cpu")
        tokens = torch.full((len(p.seq_ids),), -1, dtype=torch.long, device=where)
        logprobs: list | None = None
        if rows:
            drawn = self.sampler.sample([p.seq_ids[i] for i in rows], logits if every else logits[rows])
            if self.host_phases:
                self.host_phases.lap("sample")
            if every:
                tokens = drawn.tokens.to(where)
            else:
                tokens[list_to_device(rows, where)] = drawn.tokens.to(where)
            if drawn.pending is not None and self.defer_tokens:  # read with the tokens, after their event
                logprobs = _LateLogprobs(drawn.pending.to_host(), rows, len(p.seq_ids))
            else:
                drawn_lp = drawn.logprobs  # read once: each read copies the device's values to the host
                if any(lp is not None for lp in drawn_lp):
                    logprobs = _payload_logprobs(drawn_lp, rows, len(p.seq_ids))
        ready = None
        if self.defer_tokens:
            self._last_tokens = (p.step, tokens)
            tokens, ready = _copy_back(tokens)
        if self.host_phases:
            self.host_phases.lap("tokens")
        return tokens, logprobs, ready


def _payload_logprobs(drawn: list, rows: list[int], width: int) -> list:
    """A draw's per-row log-probabilities (rows ``rows`` of the layout) as TokenPayload.logprobs."""
    out: list = [None] * width
    for i, lp in zip(rows, drawn):
        out[i] = None if lp is None else [lp.logprob, [list(t) for t in lp.top]]
    return out


class _LateLogprobs:
    """TokenPayload.logprobs of a step run ahead: the draw's log-probabilities copied back behind the step like its
    tokens, turned into lists once the payload's ``ready`` event has passed (``TokenPayload.settle``)."""

    def __init__(self, pending, rows: list[int], width: int):
        self.pending, self.rows, self.width = pending, rows, width

    def __call__(self) -> list:
        return _payload_logprobs(self.pending.lists(), self.rows, self.width)


def _copy_back(tokens: torch.Tensor) -> tuple[torch.Tensor, object]:
    """A host copy of device tokens, queued behind the step (pinned memory, no wait), and the event to wait on
    before reading it; on the CPU a plain copy and no event."""
    if tokens.device.type != "cuda":
        return tokens.clone(), None
    host = to_host_queued(tokens)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(tokens.device))
    return host, ready


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
