"""Glue between the processor and the engine for one request: prompt conversion and the streamed text.

Used by the CLI, the demo and the server (whose streaming loop reads the same ``TextStream``).
"""

from __future__ import annotations

import time
from typing import Any

from .engine import Prompt, Sequence
from .processor import PromptInputs
from .reasoning import ReasoningStreamParser, split_reasoning
from .sampling import StopStringMatcher


def to_prompt(p: PromptInputs) -> Prompt:
    grid = lambda g: [tuple(int(x) for x in row) for row in g.tolist()] if g is not None else None  # noqa: E731
    return Prompt(list(p.input_ids), list(p.mm_token_type_ids), p.pixel_values, grid(p.image_grid_thw),
                  p.pixel_values_videos, grid(p.video_grid_thw))


class TextStream:
    """Token ids of one sequence in; (reasoning delta, content delta, stopped) out. Stop strings are matched on the
    whole generated text (reasoning included); the stop string itself is never returned."""

    def __init__(self, processor: Any, stops: tuple[str, ...] = ()):
        self.detok = processor.detokenizer()
        self.stops = StopStringMatcher(stops)
        self.reasoning = ReasoningStreamParser()

    def add(self, token: int) -> tuple[str, str, bool]:
        text, stopped = self.stops.feed(self.detok.add(token))
        r, c = self.reasoning.feed(text)
        if stopped:
            r2, c2 = self.reasoning.finish()
            r, c = r + r2, c + c2
        return r, c, stopped

    def finish(self) -> tuple[str, str, bool]:
        """The end of the output: release held-back text (a partial stop string, an unfinished tag).

        The last bytes may still complete a stop string (then stopped is True)."""
        text, stopped = self.stops.feed(self.detok.finish())
        r, c = self.reasoning.feed(text + ("" if stopped else self.stops.flush()))
        r2, c2 = self.reasoning.finish()
        return r + r2, c + c2, stopped


def result_dict(seq: Sequence, prompt_ids: list[int], text: str, stage_stats: list[dict]) -> dict:
    reasoning, content = split_reasoning(text)
    n = len(seq.output)
    prefill_s = (seq.t_first_token or seq.t_submit) - seq.t_submit
    decode_s = (seq.t_done or time.perf_counter()) - (seq.t_first_token or seq.t_submit)
    return {
        "prompt_token_ids": prompt_ids,
        "token_ids": seq.output,
        "text": text,
        "reasoning": reasoning,
        "content": content,
        "finish_reason": seq.finish_reason,
        "timings": {
            "prefill_ms": round(prefill_s * 1000, 3),
            "decode_ms_per_token": round(decode_s * 1000 / max(n - 1, 1), 3),
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": n,
            "stages": stage_stats,
        },
    }
