"""Compile a stage's prompt-path kernels at start-up, so that no request waits for the compiler.

Triton compiles a kernel the first time it is launched with a new set of compile-time values. The decode step is
captured in CUDA graphs at start-up (``runtime.cuda_graph``), which compiles its kernels then. The prompt path is
not captured. Without this warm-up, a prompt whose token count falls in a bucket not seen before (the alignment
kernel's sort width, the expert tile table's row ranges, the GEMV tiles of short prompts) waits about a second per
kernel, so the first request of a new size pays seconds (measured on the H200: scripts/compile_trace.py).

Token and pair counts are not compile-time values (``do_not_specialize``), so one step per power-of-two size up to
the step budget reaches every bucket. Each size runs once through this stage's layers as prompts whose block tables
list only the cache's scratch block, which no sequence owns. A stage that holds the vision tower also encodes one
small image, which compiles the fused blocks' kernels (a new image size still captures its own graph on first use).
"""

from __future__ import annotations

import time

import torch

from ..model.batch import SeqLayout
from ..model.qwen3_vl import Qwen3VLMoe


def prompt_sizes(max_tokens: int) -> list[int]:
    """Token counts that reach every compile-time bucket of the prompt path: 2, 3 (an odd count, for kernels that
    keep Triton's specialisation of counts), the powers of two below ``max_tokens``, and ``max_tokens``."""
    sizes = {2, 3, max_tokens}
    p = 4
    while p < max_tokens:
        sizes.add(p)
        p *= 2
    return sorted(s for s in sizes if 2 <= s <= max_tokens)


def warm_layout(t: int, block: int, block_size: int, max_len: int) -> SeqLayout:
    """A step of t prompt tokens all in cache block ``block``: one prompt, or prompts of ``max_len`` tokens and the
    rest where t is more than a sequence holds. Every table entry is that block: the prompts overwrite each other's
    keys there, which nothing reads."""
    lens = [max_len] * (t // max_len) + ([t % max_len] if t % max_len else [])
    return SeqLayout([[block] * -(-n // block_size) for n in lens], [0] * len(lens), lens)


def warm_prompt_path(model, cache, max_tokens: int, vision: bool = True) -> list[int]:
    """Run ``model`` (a stage, or anything called as one) on one step of each of ``prompt_sizes(max_tokens)``
    prompt tokens in the cache's scratch block; returns the sizes run. Only that block of the cache is written."""
    stage = _stage_model(model)
    cfg = stage.cfg.text
    p = next(stage.parameters())
    sizes = prompt_sizes(max_tokens)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for t in sizes:
            layout = warm_layout(t, cache.scratch_block, cache.block_size, cache.max_seq_len)
            ids = torch.randint(0, cfg.vocab_size, (t,), generator=g)
            hidden = None if stage.has_embed else (torch.randn(t, cfg.hidden_size, generator=g) * 0.1).to(p)
            positions = torch.cat([torch.arange(n) for n in layout.lens]).repeat(3, 1)  # text: the 3 axes agree
            model(positions=positions.to(p.device), layout=layout, cache=cache,
                  input_ids=ids.to(p.device) if stage.has_embed else None, hidden=hidden)
        if vision and stage.has_vision:
            _warm_vision(stage)
    return sizes


def _stage_model(model) -> Qwen3VLMoe:
    """The stage model itself: ``model``, or the one a wrapper (GraphedStage) holds as ``.model``."""
    return model if isinstance(model, Qwen3VLMoe) else model.model


def _warm_vision(stage: Qwen3VLMoe) -> None:
    """One 4x4-patch image through the tower as requests run it (the fused blocks on a GPU), without keeping a
    CUDA graph for its shape."""
    tower = stage.model.visual
    grid = [(1, 4, 4)]
    p = next(tower.parameters())
    pixels = torch.randn(16, tower.cfg.patch_dim, generator=torch.Generator().manual_seed(1)).to(p)
    tower.run_layers(pixels, grid, getattr(tower.runner, "block_fn", None))


def warm_stage(model, cache, max_tokens: int, name: str = "stage", quiet: bool = False) -> float:
    """``warm_prompt_path`` timed, with one line of progress; returns the seconds it took."""
    start = time.perf_counter()
    sizes = warm_prompt_path(model, cache, max_tokens)
    device = next(_stage_model(model).parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    took = time.perf_counter() - start
    if not quiet and sizes:  # (a step budget of 1 token has only decode steps, which the graphs compiled)
        print(f"{name}: prompt kernels compiled ({len(sizes)} sizes up to {sizes[-1]} tokens) in {took:.1f} s",
              flush=True)
    return took
