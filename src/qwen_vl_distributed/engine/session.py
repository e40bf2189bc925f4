"""Glue between the processor and the engine for one request: prompt conversion and the CLI's result.

Used by the CLI and the demo; the text itself comes from ``output.OutputStream``, as on the server.
"""

from __future__ import annotations

import time
from .engine import Prompt, Sequence
from .output import output_stream
from .processor import PromptInputs


def to_prompt(p: PromptInputs) -> Prompt:
    grid = lambda g: [tuple(int(x) for x in row) for row in g.tolist()] if g is not None else None  # noqa: E731
    return Prompt(list(p.input_ids), list(p.mm_token_type_ids), p.pixel_values, grid(p.image_grid_thw),
                  p.pixel_values_videos, grid(p.video_grid_thw))


def result_dict(seq: Sequence, prompt_ids: list[int], processor, stage_stats: list[dict]) -> dict:
    """The CLI's --json result of a finished sequence."""
    out = output_stream(processor, prompt_ids)
    for token in seq.output:
        out.add(token)
    out.finish()
    n = len(seq.output)
    prefill_s = (seq.t_first_token or seq.t_submit) - seq.t_submit
    decode_s = (seq.t_done or time.perf_counter()) - (seq.t_first_token or seq.t_submit)
    return {
        "prompt_token_ids": prompt_ids,
        "token_ids": seq.output,
        "text": processor.decode(seq.output),
        "reasoning": out.reasoning,
        "content": out.content,
        "finish_reason": seq.finish_reason,
        "timings": {
            "prefill_ms": round(prefill_s * 1000, 3),
            "decode_ms_per_token": round(decode_s * 1000 / max(n - 1, 1), 3),
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": n,
            "stages": stage_stats,
        },
    }
