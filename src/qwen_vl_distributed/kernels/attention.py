"""Cache attention impl 'fast': split-KV Triton decode; for prompts, chunks and mixed steps one Triton launch over the
cache (``kernels.extend_attention``), or SDPA (cuDNN first on Hopper) per sequence.

Shapes: T packed new tokens, NH query heads, KVH kv heads, D head_dim, NB cache blocks, BS block size.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..model.batch import SeqLayout
from ..model.kv_cache import gather_kv
from .choices import DEFAULT, KernelChoices


def fast_sdpa_backends():
    """SDPA backend priority: cuDNN (fastest on Hopper for causal GQA), then flash, then the rest."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # a torch without set_priority: plain allow-list
        return sdpa_kernel(order)


def _backends_for(q: torch.Tensor):
    return fast_sdpa_backends() if q.is_cuda else contextlib.nullcontext()


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: SeqLayout,
                      scale: float, fa4: bool = False) -> torch.Tensor:
    """One SDPA per sequence with GQA left to the kernel (no repeat of k/v); a mask only for continued chunks.
    A sequence's keys are gathered from its blocks first (SDPA takes them contiguous; ~16 MB per layer for an
    8k-token prompt of the 235B, against a ~2 ms kernel). Returns [T, NH, D], possibly strided (a single
    sequence's output is SDPA's own, not copied). ``fa4``: FlashAttention 4 (kernels.cute) instead of SDPA where it
    runs, its causal mask aligned to the last key as a continued chunk's is (``KernelChoices.prompt_fa4``)."""
    offsets = layout.offsets()
    outs = []
    if fa4:
        from .cute import chosen_runs, first_output

        fa4 = chosen_runs("fa4", q, "prompt attention")
    with _backends_for(q):
        for i, (table, start, n) in enumerate(zip(layout.block_tables, layout.starts, layout.lens)):
            total = start + n
            if fa4 and n > 1:
                from flash_attn.cute import flash_attn_func

                qi = q[offsets[i]:offsets[i + 1]].unsqueeze(0)  # [1, n, NH, D]
                ki, vi = (gather_kv(c, table, total).transpose(0, 1).unsqueeze(0) for c in (k_cache, v_cache))
                outs.append(first_output(flash_attn_func(qi, ki, vi, softmax_scale=scale, causal=True))[0])
                continue
            qi = q[offsets[i]:offsets[i + 1]].transpose(0, 1).unsqueeze(0)  # [1, NH, n, D]
            ki = gather_kv(k_cache, table, total).unsqueeze(0)  # [1, KVH, total, D]
            vi = gather_kv(v_cache, table, total).unsqueeze(0)
            mask, causal = None, False
            if n > 1 and start == 0:
                causal = True
            elif n > 1:  # a chunk continuing a cached prefix: query r sees keys [0, start + r]
                rows = torch.arange(n, device=q.device)[:, None] + start
                mask = torch.arange(total, device=q.device)[None, :] <= rows
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=causal, scale=scale,
                                               enable_gqa=True)
            outs.append(o[0].transpose(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _triton_decode_ok(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the split-KV kernel takes these tensors (any head_dim: its tiles pad it). Decode steps under
    CUDA-graph capture rely on it: the other paths read the step's layout from host lists."""
    return q.is_cuda and q.stride(-1) == 1 and k_cache.stride(-1) == 1 and q.shape[1] % k_cache.shape[1] == 0


def prompt_attention_path(layout: SeqLayout, choices: KernelChoices = DEFAULT) -> str:
    """Which path a step that is not all decode rows takes on a GPU: "triton" or "sdpa" (kernels.choices)."""
    lone_long = (len(layout.lens) == 1 and layout.starts[0] == 0
                 and layout.lens[0] >= choices.prompt_sdpa_min_tokens)
    return "sdpa" if choices.prompt_attention == "sdpa" or lone_long else "triton"


def fast_cache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: SeqLayout,
                         scale: float, choices: KernelChoices = DEFAULT) -> torch.Tensor:
    if layout.is_decode and _triton_decode_ok(q, k_cache):
        from .decode_attention import decode_attention  # Triton only where a GPU runs it

        return decode_attention(q, k_cache, v_cache, layout.block_table(q.device),
                                layout.tensor("starts", q.device), scale)
    if q.is_cuda and prompt_attention_path(layout, choices) == "triton":
        from . import extend_attention as ea

        if ea.supported(q, k_cache, v_cache):
            return ea.extend_attention(q, k_cache, v_cache, layout, scale, choices.extend_split)
    return prefill_attention(q, k_cache, v_cache, layout, scale, fa4=choices.prompt_fa4)
