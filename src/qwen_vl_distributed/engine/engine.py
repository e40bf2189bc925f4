"""The driver: admits requests into KV slots, groups sequences into micro-batches, builds each step's payload,
hands it to the executor (S = 1 local, or the pipeline), and turns sampled tokens into per-sequence events.

Continuous batching: sequences join (prefill) and leave (stop, length, abort) between steps. With S stages the
running sequences are split into up to S micro-batch groups, each with at most one step in flight, so every stage
can be busy at once.

Chunked prefill: a step carries at most ``max_step_tokens`` tokens -- one per decoding sequence, then prompt
tokens. A prompt that does not fit goes in chunks over several steps, each chunk writing its KV at the prompt's
next offset; only the step with a prompt's last chunk samples its first token. Chunks never split an image or a
video frame (the vision tower sees whole ones), so a chunk may run past the budget by the rest of one image.

Prefix reuse: a freed slot keeps its KV cache, and the engine remembers which tokens (and which images and video
frames) it holds. A new prompt is admitted into the free slot that holds the longest prefix of it, and its prefill
starts after that prefix -- a multi-turn chat re-sends its history, and only the new turn is computed. Tokens
must match and so must the pixels of every image / video frame in the prefix; at least the prompt's last token is
always computed (its logits give the first new token).
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UserError
from ..model.batch import SeqLayout
from ..model.config import ModelConfig
from ..model.positions import IMAGE, VIDEO, rope_positions, token_types, visual_items
from ..model.qwen3_vl import VisualInputs
from ..pipeline.payload import StepPayload

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
    slot: int = -1
    group: int = -1
    positions: torch.Tensor | None = None  # [3, L] prompt positions
    rope_delta: int = 0
    items: list = field(default_factory=list)  # positions.visual_items of the prompt
    digests: list[bytes] = field(default_factory=list)  # per item: its grid and pixels, hashed (prefix reuse)
    output: list[int] = field(default_factory=list)
    prefilled: bool = False  # the whole prompt is cached and its first token sampled
    n_prefilled: int = 0  # prompt tokens cached by finished steps (chunked prefill)
    reused: int = 0  # prompt tokens found in the slot's cache at admission (prefix reuse)
    finish_reason: str | None = None
    t_submit: float = 0.0
    t_first_token: float | None = None
    t_done: float | None = None

    @property
    def num_cached(self) -> int:
        return len(self.prompt.input_ids) + len(self.output) - 1 if self.prefilled else 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _SlotCache:
    """What a free slot's KV cache holds: the first len(ids) tokens of its last sequence, and a digest of each
    image / video frame among them by its token span: {(start, end): digest}."""

    ids: list[int]
    media: dict[tuple[int, int], bytes]


@dataclass
class TokenEvent:
    seq: Sequence
    token: int
    finished: bool
    logprobs: list | None = None  # [logprob, [[id, logprob], ...]] when the sequence's params ask for them


class EngineError(RuntimeError):
    pass


class PromptError(UserError, ValueError):
    """A prompt the engine cannot take (empty, or longer than the context); the message says why."""


def _item_pixels(prompt: Prompt, item: tuple) -> torch.Tensor:
    """The patch rows of one positions.visual_items item (an image, or one video frame)."""
    kind, _, _, (t, h, w), row = item
    pixels = prompt.pixel_values if kind == IMAGE else prompt.pixel_values_videos
    return pixels[row:row + t * h * w]


def _digest(prompt: Prompt, item: tuple) -> bytes:
    """An image's / video frame's identity for prefix reuse: its grid and pixel bytes, hashed once at add()."""
    kind, _, _, (t, h, w), _ = item
    rows = _item_pixels(prompt, item).detach().to("cpu").contiguous()
    digest = hashlib.blake2b(f"{kind}:{t}x{h}x{w}:{rows.dtype}".encode(), digest_size=16)
    digest.update(rows.view(torch.uint8).numpy().data if rows.numel() else b"")
    return digest.digest()


class Engine:
    def __init__(self, cfg: ModelConfig, executor, num_slots: int, max_len: int, eos_ids: list[int],
                 num_groups: int | None = None, max_step_tokens: int | None = None):
        self.cfg = cfg
        # Tokens one step may carry (decodes plus prompt chunks): bounds activation memory and how long a prompt
        # holds up the running sequences; the stage plan's workspace estimate uses the same number (its
        # prefill_chunk), or the largest image plus the decodes when that is more.
        self.max_step_tokens = max_step_tokens or max_len
        self.executor = executor
        self.max_len = max_len
        self.eos_ids = frozenset(eos_ids)
        self.num_groups = num_groups or executor.num_stages
        self.free_slots = deque(range(num_slots))  # least recently freed first
        self.slot_cache: dict[int, _SlotCache] = {}  # free slots' cached prefixes
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        # group -> its step in flight: (sequence, end of its prompt chunk, or -1 for a decode row)
        self.in_flight: dict[int, list[tuple[Sequence, int]]] = {}
        self.order: deque[int] = deque()  # groups in submission order (the pipeline is FIFO)
        self._ids = itertools.count()
        self._step = itertools.count()

    # -- requests ---------------------------------------------------------------------------------------------------
    def add(self, prompt: Prompt, params: Any) -> Sequence:
        if not prompt.input_ids:
            raise PromptError("the prompt is empty")
        limit = self.max_len - len(prompt.input_ids)
        if limit < 1:
            raise PromptError(f"the prompt is {len(prompt.input_ids)} tokens; the context is {self.max_len} tokens "
                              "(prompt plus at least one new token; raise --max-len)")
        eos = () if getattr(params, "ignore_eos", False) else self.eos_ids
        stop = set(eos) | set(getattr(params, "stop_token_ids", None) or ())
        seq = Sequence(next(self._ids), prompt, params, min(params.max_new_tokens, limit), frozenset(stop),
                       t_submit=time.perf_counter())
        types = prompt.token_types or token_types(prompt.input_ids, self.cfg.image_token_id, self.cfg.video_token_id)
        prompt.token_types = types
        seq.positions, seq.rope_delta = rope_positions(types, prompt.image_grid_thw, prompt.video_grid_thw,
                                                       self.cfg.vision.spatial_merge_size)
        seq.items = visual_items(types, prompt.image_grid_thw, prompt.video_grid_thw)
        seq.digests = [_digest(prompt, item) for item in seq.items]
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence (client gone); its slot is freed once no step of it is in flight."""
        self.finish(seq, "abort")

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.in_flight)

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV cache held by running sequences (slots taken / slots)."""
        total = len(self.free_slots) + len(self.running)
        return len(self.running) / total if total else 0.0

    # -- the loop -------------------------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Admit, submit a step for every idle group, then collect one finished step's tokens."""
        self._admit()
        for g in range(self.num_groups):
            if g not in self.in_flight:
                self._submit(g)
        if not self.in_flight:
            self.executor.idle()
            return []
        return self._collect()

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    def _admit(self) -> None:
        """Admit waiting sequences in arrival order while slots are free. Among those admitted together, the ones
        that can reuse a slot's cache choose first, so one that matches nothing never takes the slot holding
        another's prefix."""
        batch = [self.waiting.popleft() for _ in range(min(len(self.waiting), len(self.free_slots)))]
        # usable prefix of each admitted prompt in each cached free slot (slot_cache holds free slots only)
        reuse = {s.id: {slot: self._reusable(s, c) for slot, c in self.slot_cache.items()} for s in batch}
        for seq in sorted(batch, key=lambda s: -max(reuse[s.id].values(), default=0)):  # (stable among equals)
            seq.slot, seq.reused = self._pick_slot(reuse[seq.id])
            seq.n_prefilled = seq.reused
        for seq in batch:
            sizes = [0] * self.num_groups
            for s in self.running.values():
                sizes[s.group] += 1
            seq.group = min(range(self.num_groups), key=lambda g: (sizes[g], g))
            self.running[seq.id] = seq

    def _pick_slot(self, reuse: dict[int, int]) -> tuple[int, int]:
        """A free slot for a prompt whose usable prefix in each cached slot is ``reuse`` (slot -> tokens), and how
        many of its tokens that slot's cache already holds. The slot with the longest usable prefix, if that prefix
        is at least half of what the slot caches; otherwise an empty slot when there is one (a short shared prefix,
        say a system prompt, is not worth a long conversation's cache); otherwise the best match or, with none, the
        least recently freed slot."""
        best, best_n = None, 0
        for slot in self.free_slots:
            n = reuse.get(slot, 0)  # (a slot another admitted prompt took is no longer free)
            if n > best_n:
                best, best_n = slot, n
        empty = next((s for s in self.free_slots if s not in self.slot_cache), None)
        if best is None or (2 * best_n < len(self.slot_cache[best].ids) and empty is not None):
            best, best_n = (empty if empty is not None else self.free_slots[0]), 0
        self.free_slots.remove(best)
        self.slot_cache.pop(best, None)
        return best, best_n

    @staticmethod
    def _reusable(seq: Sequence, cached: _SlotCache) -> int:
        """Prompt tokens of seq whose KV the cached prefix already holds: the common prefix of the token ids, cut
        before the first image / video frame whose pixels differ (their placeholders are the same ids) and before
        any one it would split; never the prompt's last token."""
        ids = seq.prompt.input_ids
        limit = min(len(ids) - 1, len(cached.ids))
        n = 0
        while n < limit and ids[n] == cached.ids[n]:
            n += 1
        for (_, start, stop, _, _), digest in zip(seq.items, seq.digests):
            if start >= n:
                break
            if stop > n or cached.media.get((start, stop)) != digest:
                return start
        return n

    def _remember(self, seq: Sequence) -> None:
        """Record what seq leaves in its slot's cache: every token whose KV a finished step wrote."""
        n = seq.num_cached if seq.prefilled else seq.n_prefilled
        if n < 1:
            return
        media = {(start, stop): d for (_, start, stop, _, _), d in zip(seq.items, seq.digests) if stop <= n}
        self.slot_cache[seq.slot] = _SlotCache((seq.prompt.input_ids + seq.output)[:n], media)

    def _submit(self, group: int) -> None:
        members = self._step_members(group)
        if not members:
            return
        payload = self._build_step(group, members)
        self.in_flight[group] = members
        self.order.append(group)
        self.executor.submit(payload)

    def _step_members(self, group: int) -> list[tuple[Sequence, int]]:
        """(sequence, end) for the group's next step: every decoding sequence (end -1), then waiting prompts in
        arrival order, each with its next chunk [n_prefilled, end), while the step stays within max_step_tokens.
        The first prompt chunk always goes (at least one token, or one whole image/video), so no prompt starves."""
        members = [s for s in self.running.values() if s.group == group and not s.done]
        step: list[tuple[Sequence, int]] = [(s, -1) for s in members if s.prefilled]
        budget = self.max_step_tokens - len(step)
        first = True
        for s in members:
            if s.prefilled:
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

    @staticmethod
    def _chunk_end(s: Sequence, budget: int) -> int:
        """End of the prompt chunk starting at s.n_prefilled with about ``budget`` tokens: cut before an image or
        video frame the budget would split, or after it when the chunk starts with it."""
        a, n = s.n_prefilled, len(s.prompt.input_ids)
        b = min(n, a + budget)
        for _, start, stop, _, _ in s.items:
            if start < b < stop:
                return start if start > a else stop
        return b

    def _build_step(self, group: int, members: list[tuple[Sequence, int]]) -> StepPayload:
        ids, pos, types, slots, starts, lens, new = [], [], [], [], [], [], {}
        continued, open_prompts = [], []
        vis = {"img": [], "img_grid": [], "vid": [], "vid_grid": []}
        for s, end in members:
            slots.append(s.slot)
            if not s.prefilled:
                p, a = s.prompt, s.n_prefilled
                ids += p.input_ids[a:end]
                pos.append(s.positions[:, a:end])
                types += p.token_types[a:end]
                starts.append(a)
                lens.append(end - a)
                if a == s.reused:  # the request's first step
                    new[s.slot] = {"params": s.params.wire()}
                    if getattr(s.params, "min_tokens", 0):
                        new[s.slot]["stop_ids"] = sorted(s.stop_ids)  # banned until min_tokens are out
                    if a and s.params.needs_history:
                        new[s.slot]["history_prefix"] = p.input_ids[:a]  # penalties see the reused prefix too
                else:
                    continued.append(s.slot)
                if end < len(p.input_ids):
                    open_prompts.append(s.slot)
                self._chunk_media(s, a, end, vis)
            else:
                n = s.num_cached
                ids.append(s.output[-1])
                pos.append(torch.full((3, 1), n + s.rope_delta, dtype=torch.long))
                types.append(0)  # a generated token is just a token, even if its id is <|image_pad|>
                starts.append(n)
                lens.append(1)
        visual = None
        if vis["img"] or vis["vid"]:
            tt = torch.tensor(types)
            visual = VisualInputs(
                pixel_values=torch.cat(vis["img"]) if vis["img"] else None, image_grid_thw=vis["img_grid"] or None,
                pixel_values_videos=torch.cat(vis["vid"]) if vis["vid"] else None,
                video_grid_thw=vis["vid_grid"] or None, image_mask=tt == IMAGE, video_mask=tt == VIDEO)
        return StepPayload("step", group, next(self._step), SeqLayout(slots, starts, lens), torch.cat(pos, dim=1),
                           torch.tensor(ids, dtype=torch.long), None, new, visual, continued=continued,
                           open_prompts=open_prompts)

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
        now = time.perf_counter()
        events = []
        logprobs = result.logprobs or [None] * len(members)
        for (s, end), tok, lp in zip(members, result.tokens.tolist(), logprobs):
            if s.done:  # aborted while in flight
                self._release(s)
                continue
            if end != -1 and end < len(s.prompt.input_ids):  # a prompt chunk short of the end: nothing sampled
                s.n_prefilled = end
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
                self._release(s)
        return events

    def _release(self, seq: Sequence) -> None:
        if self.running.pop(seq.id, None) is not None:
            self._remember(seq)
            self.free_slots.append(seq.slot)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence for a reason found outside the engine (a stop string matched in its text, a client
        gone); its slot is freed at once, or when the step it is in comes back."""
        if seq.done:
            return
        seq.finish_reason = reason
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif not any(seq is s for members in self.in_flight.values() for s, _ in members):
            self._release(seq)
