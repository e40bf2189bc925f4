"""The driver: admits requests, gives each sequence its KV blocks, groups sequences into micro-batches, builds each
step's payload, hands it to the executor (S = 1 local, or the pipeline), and turns sampled tokens into events.

Continuous batching: sequences join (prefill) and leave (stop, length, abort) between steps; at most ``max_batch``
run at once. With S stages the running sequences are split into up to S micro-batch groups, each with at most one
step in flight, so every stage can be busy at once.

KV blocks (engine/kv_blocks.py): a sequence is admitted when the pool can hold its whole prompt (plus a block of
headroom for each running sequence); it takes one more block whenever its last one fills while decoding. When no
block is free, the most recently arrived sequence that has no step in flight is preempted: its blocks are freed
and it waits again, to be computed anew when there is room (its prompt and what it has generated, whose blocks
the prefix cache may still hold; its sampler state lives on). A sequence with a step in flight is never preempted,
so a step that cannot get a block for some sequence goes without it and that sequence waits for the next step.
Requests that could never fit (prompt plus max_tokens beyond the whole pool) are refused at ``add``. So the
oldest running sequence always makes progress: no deadlock.

Chunked prefill: a step carries at most ``max_step_tokens`` tokens -- one per decoding sequence, then prompt
tokens. A prompt that does not fit goes in chunks over several steps; only the step with a prompt's last chunk
samples its first token. Chunks never split an image or a video frame (the vision tower sees whole ones), so a
chunk may run past the budget by the rest of one image.

Prefix cache: a prompt starts from the longest run of full blocks, named by their tokens and media, that the cache
holds (engine/kv_blocks.py), cut back to a block boundary that splits no image or video frame (whose vision
features are then computed whole, never for part of an image) and never covering the prompt's last token (its
logits give the first new token). A block is named as soon as the step that fills it is submitted: each stage
runs steps in submission order, so a later step that reads the block runs after it is written. The n choices of
one request (sequences added with the same Prompt object) share the prompt's blocks: the later ones wait until
the first one's prompt has been submitted, then take its blocks from the cache and compute only the tail.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..errors import UserError
from ..model.batch import SeqLayout
from ..model.config import ModelConfig
from ..model.kv_cache import blocks_for
from ..model.positions import IMAGE, VIDEO, rope_positions, token_types, visual_items
from ..model.qwen3_vl import VisualInputs
from ..pipeline.host_phases import HostPhases
from ..pipeline.payload import StepPayload
from ..pipeline.plan import DEFAULT_KV_BLOCK_SIZE
from .kv_blocks import BlockPool, MediaSpan, name_blocks

@dataclass
class Prompt:
    """A tokenised prompt with its media (what the processor produces)."""

    input_ids: list[int]
    token_types: list[int] | None = None  # 0 text / 1 image / 2 video per token; derived from ids when None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: list[tuple[int, int, int]] | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: list[tuple[int, int, int]] | None = None


@dataclass
class Sequence:
    id: int
    prompt: Prompt
    params: Any  # SamplingParams
    max_new_tokens: int
    stop_ids: frozenset[int]
    group: int = -1
    positions: torch.Tensor | None = None  # [3, L] prompt positions
    rope_delta: int = 0
    items: list = field(default_factory=list)  # positions.visual_items of the prompt
    media: list[MediaSpan] = field(default_factory=list)  # per item: its token span and digest (prefix cache)
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # its block table: KV of tokens [0, len(blocks) * block size)
    names: list[bytes] = field(default_factory=list)  # prefix-cache names of its full blocks, as far as computed
    n_named: int = 0  # its first n_named blocks are in the prefix cache under their names
    prefilled: bool = False  # every token but the last has its KV cached: the sequence decodes
    n_prefilled: int = 0  # tokens whose KV the steps submitted so far write (chunked prefill)
    target: int = 0  # tokens this admission prefills: the prompt, or after a preemption all but the last token
    admitted_at: int = 0  # tokens found in the prefix cache at this admission: where its first chunk starts
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache before its first token (usage)
    preemptions: int = 0
    finish_reason: str | None = None
    t_submit: float = 0.0
    t_first_token: float | None = None
    t_done: float | None = None

    @property
    def num_cached(self) -> int:
        """Tokens whose KV is in the cache (or being written by a submitted step)."""
        return len(self.prompt.input_ids) + len(self.output) - 1 if self.prefilled else self.n_prefilled

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def tokens(self, a: int, b: int) -> list[int]:
        """Its tokens [a, b): prompt, then output."""
        ids, n = self.prompt.input_ids, len(self.prompt.input_ids)
        return (ids[a:b] if a < n else []) + self.output[max(a - n, 0):max(b - n, 0)]


@dataclass
class TokenEvent:
    seq: Sequence
    token: int
    finished: bool
    logprobs: list | None = None  # [logprob, [[id, logprob], ...]] when the sequence's params ask for them


@dataclass(frozen=True)
class CacheStats:
    """The KV pool and prefix cache as the engine thread last saw them (counters since start)."""

    blocks: int = 0
    block_size: int = 0
    blocks_used: int = 0
    prompt_tokens: int = 0  # tokens looked up in the prefix cache at admissions
    cached_tokens: int = 0  # of those, found there
    computed_tokens: int = 0  # prompt (and recomputed) tokens the steps computed
    preemptions: int = 0

    @property
    def usage(self) -> float:
        """Fraction of the pool's blocks held by sequences (0 to 1)."""
        return self.blocks_used / self.blocks if self.blocks else 0.0


class EngineError(RuntimeError):
    pass


class PromptError(UserError, ValueError):
    """A prompt the engine cannot take (empty, longer than the context, or more KV than the pool holds); the
    message says why."""


def _item_pixels(prompt: Prompt, item: tuple) -> torch.Tensor:
    """The patch rows of one positions.visual_items item (an image, or one video frame)."""
    kind, _, _, (t, h, w), row = item
    pixels = prompt.pixel_values if kind == IMAGE else prompt.pixel_values_videos
    return pixels[row:row + t * h * w]


def _digest(prompt: Prompt, item: tuple) -> bytes:
    """An image's / video frame's identity for the prefix cache: its grid and pixel bytes, hashed once at add()."""
    kind, _, _, (t, h, w), _ = item
    rows = _item_pixels(prompt, item).detach().to("cpu").contiguous()
    digest = hashlib.blake2b(f"{kind}:{t}x{h}x{w}:{rows.dtype}".encode(), digest_size=16)
    digest.update(rows.view(torch.uint8).numpy().data if rows.numel() else b"")
    return digest.digest()


class Engine:
    def __init__(self, cfg: ModelConfig, executor, max_batch: int, max_len: int, eos_ids: list[int], *,
                 num_blocks: int | None = None, block_size: int = DEFAULT_KV_BLOCK_SIZE, prefix_cache: bool = True,
                 num_groups: int | None = None, max_step_tokens: int | None = None, run_ahead: bool = False):
        """``num_blocks`` KV blocks of ``block_size`` tokens (every stage's pool; default: room for ``max_batch``
        sequences of ``max_len``); ``max_batch``: the most sequences running at once; ``run_ahead``: submit a
        group's next decode step before reading the tokens of the one in flight (one stage of one rank only)."""
        self.cfg = cfg
        # Tokens one step may carry (decodes plus prompt chunks): bounds activation memory and how long a prompt
        # holds up the running sequences; the stage plan's workspace estimate uses the same number (its
        # prefill_chunk), or the largest image plus the decodes when that is more.
        self.max_step_tokens = max_step_tokens or max_len
        self.executor = executor
        self.max_batch = max_batch
        self.max_len = max_len
        self.eos_ids = frozenset(eos_ids)
        self.num_groups = num_groups or executor.num_stages
        self.pool = BlockPool(num_blocks or max_batch * blocks_for(max_len, block_size), block_size, prefix_cache)
        self.waiting: deque[Sequence] = deque()  # by arrival (preempted sequences go back in their place)
        self.running: dict[int, Sequence] = {}
        # group -> its step in flight: (sequence, end of its prompt chunk, or -1 for a decode row)
        self.in_flight: dict[int, list[tuple[Sequence, int]]] = {}
        # group -> a decode step submitted behind its step in flight, before that one's tokens were read (run-ahead)
        self.ahead: dict[int, list[tuple[Sequence, int]]] = {}
        self._flight_step: dict[int, int] = {}  # group -> the step number of its newest submitted step
        self.order: deque[int] = deque()  # groups in submission order (the pipeline is FIFO)
        self._released: list[int] = []  # ended sequences whose sampler state the next step drops
        self._counts = {"prompt_tokens": 0, "cached_tokens": 0, "computed_tokens": 0, "preemptions": 0}
        self._ids = itertools.count()
        self._step = itertools.count()
        self.host_phases: HostPhases | None = None  # opt-in host timers (bench-pipeline), off by default
        self.run_ahead = False
        if run_ahead:
            self.set_run_ahead(True)

    def set_run_ahead(self, on: bool) -> None:
        """Submit each group's next decode step before reading the tokens of its step in flight (on), or not. The
        stage gathers the ids on the device from the step before, so this needs the one stage of one rank in this
        process and one group. Switching off with a step ahead in flight is fine: the next steps collect it."""
        if on and (not getattr(self.executor, "can_run_ahead", False) or self.num_groups != 1):
            raise ValueError("running ahead needs one stage of one rank in the driver's process and one group")
        if on or self.run_ahead:
            self.executor.run_ahead(on)
        self.run_ahead = on

    # -- requests ---------------------------------------------------------------------------------------------------
    def check(self, prompt_len: int, max_new_tokens: int) -> int:
        """The new tokens a prompt of ``prompt_len`` tokens may have (``max_new_tokens``, within the context), or
        PromptError when the request can never run: empty, no room for one new token, or more KV than the whole
        pool holds. Reads only settings fixed at start-up (safe from any thread)."""
        if prompt_len < 1:
            raise PromptError("the prompt is empty")
        limit = self.max_len - prompt_len
        if limit < 1:
            raise PromptError(f"the prompt is {prompt_len} tokens; the context is {self.max_len} tokens "
                              "(prompt plus at least one new token; raise --max-len)")
        new = min(max_new_tokens, limit)
        need = prompt_len + new - 1  # the last token's KV is never written
        pool = self.pool.num_blocks * self.pool.block_size
        if blocks_for(need, self.pool.block_size) > self.pool.num_blocks:
            raise PromptError(f"the prompt ({prompt_len} tokens) and max_tokens ({new}) need the KV of {need} "
                              f"tokens; the KV cache holds {pool} (raise --max-total-tokens or lower max_tokens)")
        return new

    def add(self, prompt: Prompt, params: Any) -> Sequence:
        new = self.check(len(prompt.input_ids), params.max_new_tokens)
        eos = () if getattr(params, "ignore_eos", False) else self.eos_ids
        stop = set(eos) | set(getattr(params, "stop_token_ids", None) or ())
        seq = Sequence(next(self._ids), prompt, params, new, frozenset(stop), t_submit=time.perf_counter())
        types = prompt.token_types or token_types(prompt.input_ids, self.cfg.image_token_id, self.cfg.video_token_id)
        prompt.token_types = types
        seq.positions, seq.rope_delta = rope_positions(types, prompt.image_grid_thw, prompt.video_grid_thw,
                                                       self.cfg.vision.spatial_merge_size)
        seq.items = visual_items(types, prompt.image_grid_thw, prompt.video_grid_thw)
        seq.media = [MediaSpan(item[1], item[2], _digest(prompt, item)) for item in seq.items]
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence (client gone); its blocks are freed once no step of it is in flight."""
        self.finish(seq, "abort")

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence for a reason found outside the engine (a stop string matched in its text, a client
        gone); its blocks are freed at once, or when the step it is in comes back."""
        if seq.done:
            return
        seq.finish_reason = reason
        if seq in self.waiting:
            self.waiting.remove(seq)
            self._released.append(seq.id)  # preempted after its first token: the sampler still holds its state
        elif not self._in_flight(seq):
            self._release(seq)

    def _flying(self) -> Iterator[Sequence]:
        """The sequences of every step submitted and not yet collected (a sequence once per step it is in)."""
        for members in itertools.chain(self.in_flight.values(), self.ahead.values()):
            yield from (s for s, _ in members)

    def _in_flight(self, seq: Sequence) -> bool:
        """Whether a submitted step not yet collected has a row of seq."""
        return any(seq is s for s in self._flying())

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.in_flight)

    def cache_stats(self) -> CacheStats:
        return CacheStats(self.pool.num_blocks, self.pool.block_size, self.pool.num_used, **self._counts)

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV cache's blocks held by sequences (``CacheStats.usage``)."""
        return self.cache_stats().usage

    # -- the loop -------------------------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Admit, submit a step for every idle group, then collect one finished step's tokens."""
        if self.host_phases:
            self.host_phases.begin()
        self._admit()
        for g in range(self.num_groups):
            if g not in self.in_flight:
                self._submit(g)
            if self.run_ahead and g in self.in_flight and g not in self.ahead:
                self._submit_ahead(g)
        if not self.in_flight:
            self.executor.idle()
            return []
        return self._collect()

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    # -- admission ------------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Admit waiting sequences in arrival order while fewer than max_batch run and the pool has room; the
        first one that does not fit waits first (no later one overtakes it). A later choice of a prompt whose
        first choice is still being submitted waits for its blocks."""
        for seq in list(self.waiting):
            if len(self.running) >= self.max_batch:
                return
            if self._sibling_prefilling(seq):
                continue
            if not self._place(seq):
                return
            self.waiting.remove(seq)

    def _sibling_prefilling(self, seq: Sequence) -> bool:
        """Whether another choice of seq's prompt still has to submit the steps that fill its full blocks."""
        if not self.pool.caching:
            return False
        full = len(seq.prompt.input_ids) // self.pool.block_size
        return any(s.prompt is seq.prompt and not s.output and s.n_named < full for s in self.running.values())

    def _place(self, seq: Sequence) -> bool:
        """Give seq its blocks for this admission's prefill (cached ones from the prefix cache, fresh ones for the
        rest) and a group; False (nothing taken) if the pool has no room for them yet."""
        pool, bs = self.pool, self.pool.block_size
        resume = bool(seq.output)  # preempted after its first token: recompute all but its last token
        target = len(seq.prompt.input_ids) + len(seq.output) - 1 if resume else len(seq.prompt.input_ids)
        hits: list[int] = []
        if pool.caching:
            name_blocks(seq.tokens, target, seq.media, bs, seq.names)
            hits = pool.lookup(seq.names[:target // bs])
        reused = self._usable(seq, min(len(hits) * bs, target if resume else target - 1))
        hits = hits[:reused // bs]
        need = blocks_for(target, bs) - len(hits)
        if need + len(self.running) > pool.num_free - pool.free_among(hits):  # headroom: a block per runner
            return False
        pool.acquire(hits)
        seq.blocks = hits + pool.allocate(need)
        seq.n_named, seq.target, seq.n_prefilled, seq.admitted_at = len(hits), target, reused, reused
        seq.prefilled = reused == target  # (only a resumed sequence: a prompt's last token is always computed)
        if not resume:
            seq.cached_tokens = reused
        self._counts["prompt_tokens"] += target
        self._counts["cached_tokens"] += reused
        sizes = [0] * self.num_groups
        for s in self.running.values():
            sizes[s.group] += 1
        seq.group = min(range(self.num_groups), key=lambda g: (sizes[g], g))
        self.running[seq.id] = seq
        return True

    def _usable(self, seq: Sequence, n: int) -> int:
        """The most of the first n tokens a prefill can start after: whole blocks, and no image or video frame
        split (its features are computed whole, in one chunk)."""
        bs = self.pool.block_size
        while True:
            n -= n % bs
            cut = next((m.start for m in seq.media if m.start < n < m.stop), None)
            if cut is None:
                return n
            n = cut

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and put it back among the waiting, in arrival order; it is computed again later."""
        self.pool.release(seq.blocks)
        seq.blocks, seq.n_named, seq.group, seq.prefilled, seq.n_prefilled = [], 0, -1, False, 0
        seq.preemptions += 1
        self._counts["preemptions"] += 1
        del self.running[seq.id]
        at = next((i for i, w in enumerate(self.waiting) if w.id > seq.id), len(self.waiting))
        self.waiting.insert(at, seq)

    # -- steps ----------------------------------------------------------------------------------------------------
    def _submit(self, group: int) -> None:
        members = self._step_members(group)
        if self.host_phases:
            self.host_phases.lap("schedule")
        if not members:
            return
        payload = self._build_step(group, members)
        self.in_flight[group] = members
        self._send(group, payload)

    def _send(self, group: int, payload: StepPayload) -> None:
        """Submit the group's step (its rows already recorded in flight or ahead)."""
        if self.host_phases:
            self.host_phases.lap("payload")
        self.order.append(group)
        self._flight_step[group] = payload.step
        self.executor.submit(payload)

    def _submit_ahead(self, group: int) -> None:
        """Run ahead: submit the group's next decode step before the tokens of its step in flight are read, taking
        them as input ids on the device (docs/distributed_design.md, "Running one step ahead"). Only when that step
        is all decode rows and holds every sequence of the group (a prompt waiting for its turn goes in the next
        synchronous step) and no row has a grammar (its mask needs the token on the host); a row whose step in
        flight gives its last token (length) sits out. A sequence that stops at the step in flight has a row here
        whose token is dropped; its blocks are freed when this step comes back."""
        prev = self.in_flight[group]
        if any(end != -1 for _, end in prev):
            return
        live = [(i, s) for i, (s, _) in enumerate(prev) if not s.done]
        members = {s.id for s in self.running.values() if s.group == group and not s.done}
        if members != {s.id for _, s in live} or any(s.params.grammar is not None for _, s in live):
            return
        rows = [(i, s) for i, s in live if len(s.output) + 1 < s.max_new_tokens]
        bs = self.pool.block_size
        grow = [s for _, s in rows if s.num_cached + 1 >= len(s.blocks) * bs]
        if not rows or len(grow) > self.pool.num_free:  # (no preemption for a step run ahead: the next one waits)
            return
        for s in grow:
            s.blocks += self.pool.allocate(1)
        step_rows = _StepRows(bs)
        for _, s in rows:
            n = s.num_cached + 1  # its token in flight is the input; the prefix cache names the block on collect
            step_rows.add(s, n, [0], torch.full((3, 1), n + s.rope_delta, dtype=torch.long), [0])
        payload = self._seal(step_rows, group)
        payload.ids_from = (self._flight_step[group], [i for i, _ in rows])
        self.ahead[group] = [(s, -1) for _, s in rows]
        self._send(group, payload)

    def _step_members(self, group: int) -> list[tuple[Sequence, int]]:
        """(sequence, end) for the group's next step: every decoding sequence that has room for its next token
        (end -1), then prompts in arrival order, each with its next chunk [n_prefilled, end), while the step stays
        within max_step_tokens. The first prompt chunk always goes (at least one token, or one whole
        image/video), so no prompt starves."""
        members = [s for s in self.running.values() if s.group == group and not s.done]
        busy = {s.id for s in self._flying()}
        step: list[tuple[Sequence, int]] = []
        for s in members:
            if s.prefilled and s.id in self.running and self._grow(s, busy, step):
                step.append((s, -1))
        budget = self.max_step_tokens - len(step)
        first = True
        for s in members:
            if s.prefilled or s.id not in self.running:
                continue
            if budget < 1 and not first:
                break
            end = self._chunk_end(s, max(budget, 1))
            if end - s.n_prefilled > budget and not first:
                break
            step.append((s, end))
            budget -= end - s.n_prefilled
            first = False
        return step

    def _grow(self, s: Sequence, busy: set[int], step: list[tuple[Sequence, int]]) -> bool:
        """Room for s's next token: one more block when its last is full, preempting the most recently arrived
        sequence with no step in flight (s itself included) while none is free. False when s sits this step out:
        it was preempted, or every other holder of blocks is in flight (their steps come back first)."""
        if s.num_cached < len(s.blocks) * self.pool.block_size:
            return True
        while self.pool.num_free == 0:
            taken = busy | {x.id for x, _ in step}
            victims = [v for v in self.running.values() if v.id not in taken]
            if not victims:
                return False
            victim = max(victims, key=lambda v: v.id)
            self._preempt(victim)
            if victim is s:
                return False
        s.blocks += self.pool.allocate(1)
        return True

    @staticmethod
    def _chunk_end(s: Sequence, budget: int) -> int:
        """End of the chunk starting at s.n_prefilled with about ``budget`` tokens: cut before an image or video
        frame the budget would split, or after it when the chunk starts with it."""
        a = s.n_prefilled
        b = min(s.target, a + budget)
        for _, start, stop, _, _ in s.items:
            if start < b < stop:
                return start if start > a else stop
        return b

    def _build_step(self, group: int, members: list[tuple[Sequence, int]]) -> StepPayload:
        rows = _StepRows(self.pool.block_size)
        for s, end in members:
            if s.prefilled:
                n = s.num_cached
                rows.add(s, n, [s.output[-1]], torch.full((3, 1), n + s.rope_delta, dtype=torch.long), [0])
                self._name_full_blocks(s, n + 1)  # (a generated token is text, even if its id is <|image_pad|>)
                continue
            a = s.n_prefilled
            rows.add(s, a, s.tokens(a, end), self._positions(s, a, end), self._types(s, a, end))
            if s.output:  # a preempted sequence computed again: nothing sampled, its sampler state lives on
                rows.open_prompts.append(s.id)
            else:
                if a == s.admitted_at:  # the first step of this admission: the sampler starts the sequence
                    rows.new[s.id] = self._sampler_start(s, a)
                else:
                    rows.continued.append(s.id)
                if end < s.target:
                    rows.open_prompts.append(s.id)
            self._chunk_media(s, a, end, rows.vis)
            s.n_prefilled = end
            self._counts["computed_tokens"] += end - a
            self._name_full_blocks(s, end)
        return self._seal(rows, group)

    def _seal(self, rows: "_StepRows", group: int) -> StepPayload:
        """The step's payload, numbered, carrying the sequences released since the last one."""
        payload = rows.payload(group, next(self._step), self._released)
        self._released = []
        return payload

    @staticmethod
    def _sampler_start(s: Sequence, a: int) -> dict:
        """What the sampler needs to start s, whose prompt's first a tokens came from the prefix cache."""
        start = {"params": s.params.wire()}
        if getattr(s.params, "min_tokens", 0):
            start["stop_ids"] = sorted(s.stop_ids)  # banned until min_tokens are out
        if a and s.params.needs_history:
            start["history_prefix"] = s.prompt.input_ids[:a]  # penalties see the cached head
        return start

    def _name_full_blocks(self, s: Sequence, n: int) -> None:
        """Put s's full blocks among its first n tokens (written by the step being submitted) in the prefix
        cache."""
        bs = self.pool.block_size
        if not self.pool.caching or n // bs <= s.n_named:
            return
        name_blocks(s.tokens, n, s.media, bs, s.names)
        for k in range(s.n_named, n // bs):
            self.pool.name(s.blocks[k], s.names[k])
        s.n_named = n // bs

    @staticmethod
    def _positions(s: Sequence, a: int, end: int) -> torch.Tensor:
        """M-RoPE positions [3, end - a] of s's tokens [a, end): the prompt's, then generated text tokens'."""
        n = len(s.prompt.input_ids)
        parts = [s.positions[:, a:min(end, n)]] if a < n else []
        if end > n:
            parts.append((torch.arange(max(a, n), end) + s.rope_delta).expand(3, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @staticmethod
    def _types(s: Sequence, a: int, end: int) -> list[int]:
        n = len(s.prompt.input_ids)
        return s.prompt.token_types[a:min(end, n)] + [0] * (end - max(a, n))

    @staticmethod
    def _chunk_media(s: Sequence, a: int, end: int, vis: dict) -> None:
        """The pixels and grids of the images / video frames whose placeholders lie in the chunk [a, end)."""
        for item in s.items:
            kind, start, _, grid, _ = item
            if a <= start < end:
                key = "img" if kind == IMAGE else "vid"
                vis[key].append(_item_pixels(s.prompt, item))
                vis[key + "_grid"].append(grid)

    def _collect(self) -> list[TokenEvent]:
        result = self.executor.collect()
        group = self.order.popleft()
        if result.mb != group:
            raise EngineError(f"pipeline returned micro-batch {result.mb}, expected {group}")
        members = self.in_flight.pop(group)
        behind = self.ahead.pop(group, None)  # its step run ahead becomes the group's step in flight
        if behind is not None:
            self.in_flight[group] = behind
        held = {s.id for s, _ in behind or ()}  # blocks still written by the step behind: freed when it is back
        now = time.perf_counter()
        events = []
        logprobs = result.logprobs or [None] * len(members)
        for (s, end), tok, lp in zip(members, result.tokens.tolist(), logprobs):
            if s.done:  # aborted while in flight, or (run-ahead) ended at the step before
                if s.id not in held:
                    self._release(s)
                continue
            if end != -1 and (end < s.target or s.output):  # a chunk short of the end, or a recomputation
                s.prefilled = end == s.target
                continue
            s.prefilled = True
            s.output.append(tok)
            if s.t_first_token is None:
                s.t_first_token = now
            if tok in s.stop_ids:
                s.finish_reason = "stop"
            elif len(s.output) >= s.max_new_tokens:
                s.finish_reason = "length"
            events.append(TokenEvent(s, tok, s.done, lp))
            if s.done:
                s.t_done = now
                if s.id not in held:
                    self._release(s)
        for s, _ in behind or ():
            if not s.done:  # the step behind writes the KV of the token just read: its full blocks get names
                self._name_full_blocks(s, s.num_cached + 1)
        if self.host_phases:
            self.host_phases.lap("bookkeeping")
        return events

    def _release(self, seq: Sequence) -> None:
        if self.running.pop(seq.id, None) is not None:
            self.pool.release(seq.blocks)
            seq.blocks = []
        self._released.append(seq.id)


class _StepRows:
    """A step's rows and per-sequence lists, gathered sequence by sequence, then made into the payload."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.tables, self.starts, self.lens, self.seq_ids = [], [], [], []
        self.ids: list[int] = []
        self.pos: list[torch.Tensor] = []
        self.types: list[int] = []
        self.new: dict[int, dict] = {}
        self.continued: list[int] = []
        self.open_prompts: list[int] = []
        self.vis: dict[str, list] = {"img": [], "img_grid": [], "vid": [], "vid_grid": []}

    def add(self, s: Sequence, start: int, ids: list[int], pos: torch.Tensor, types: list[int]) -> None:
        """s's rows at positions [start, start + len(ids)), and the part of its block table they reach."""
        self.seq_ids.append(s.id)
        self.tables.append(s.blocks[:blocks_for(start + len(ids), self.block_size)])
        self.starts.append(start)
        self.lens.append(len(ids))
        self.ids += ids
        self.pos.append(pos)
        self.types += types

    def payload(self, group: int, step: int, released: list[int]) -> StepPayload:
        vis, visual = self.vis, None
        if vis["img"] or vis["vid"]:
            tt = torch.tensor(self.types)
            visual = VisualInputs(
                pixel_values=torch.cat(vis["img"]) if vis["img"] else None, image_grid_thw=vis["img_grid"] or None,
                pixel_values_videos=torch.cat(vis["vid"]) if vis["vid"] else None,
                video_grid_thw=vis["vid_grid"] or None, image_mask=tt == IMAGE, video_mask=tt == VIDEO)
        return StepPayload("step", group, step, SeqLayout(self.tables, self.starts, self.lens),
                           torch.cat(self.pos, dim=1), torch.tensor(self.ids, dtype=torch.long), None, self.new,
                           visual, continued=self.continued, open_prompts=self.open_prompts, seq_ids=self.seq_ids,
                           released=released)
