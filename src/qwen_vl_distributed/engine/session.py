"""Glue between the processor and the engine for one request: prompt conversion and the streamed text.

Used by the CLI and the demo; the server has its own streaming loop over the same pieces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .engine import Prompt, Sequence
from .processor import PromptInputs
from .reasoning import ReasoningStreamParser, split_reasoning


def to_prompt(p: PromptInputs) -> Prompt:
    grid = lambda g: [tuple(int(x) for x in row) for row in g.tolist()] if g is not None else None  # noqa: E731
    return Prompt(list(p.input_ids), list(p.mm_token_type_ids), p.pixel_values, grid(p.image_grid_thw),
                  p.pixel_values_videos, grid(p.video_grid_thw))


@dataclass
class TextStream:
    """Token ids of one sequence -> (reasoning_delta, content_delta), and the final text fields."""

    detok: object
    parser: ReasoningStreamParser = field(default_factory=ReasoningStreamParser)

    def feed(self, token: int, last: bool) -> tuple[str, str]:
        r, c = self.parser.feed(self.detok.add(token))
        if last:
            r2, c2 = self.parser.feed(self.detok.finish())
            r3, c3 = self.parser.finish()
            r, c = r + r2 + r3, c + c2 + c3
        return r, c


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
