"""One packed q/k/v weight per attention layer, so a prompt's three projections run as one GEMM.

At a 2048-token prompt of the 235B, k and v are [4096 -> 512] products that fill under half the GPU (~15 us
each) next to q's [4096 -> 8192]; as one [4096 -> 9216] product they ride along with q. ``pack_qkv`` moves each
layer's three weights into one buffer and makes the modules' parameters views of it: no extra memory, the module
path and the state dict see the same tensors as before. Torch only (no Triton): ``enable_fast_paths`` calls it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.attention import TextAttention


def packed_qkv(attn: TextAttention) -> torch.Tensor | None:
    """The [q_dim + 2 * kv_dim, H] weight whose row blocks are q/k/v_proj.weight, if they are still laid out that
    way (a later ``load_state_dict(assign=True)`` can replace them); else None."""
    q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    if attn.q_proj.bias is not None or not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        return None
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()) or q.device.type == "meta":
        return None
    storage = q.untyped_storage().data_ptr()
    if k.untyped_storage().data_ptr() != storage or v.untyped_storage().data_ptr() != storage:
        return None  # (separate allocations can still sit back to back in one allocator segment)
    if k.storage_offset() != q.storage_offset() + q.numel() or v.storage_offset() != k.storage_offset() + k.numel():
        return None
    return q.detach().as_strided((q.shape[0] + k.shape[0] + v.shape[0], q.shape[1]), (q.shape[1], 1),
                                 q.storage_offset())


def pack_qkv(model: nn.Module) -> None:
    """Lay out every bias-free text attention's q/k/v weights back to back in one buffer (see the module doc).
    Moves weights: call it before anything (a CUDA graph) holds their addresses."""
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, so a later in-place load still works
        moved = _pack(model)
    if moved and torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the old weights' blocks back (the stage's memory plan does not count them)


def _pack(model: nn.Module) -> bool:
    moved = False
    for attn in model.modules():
        if not isinstance(attn, TextAttention) or attn.q_proj.bias is not None or packed_qkv(attn) is not None:
            continue
        linears = (attn.q_proj, attn.k_proj, attn.v_proj)
        if any(lin.weight.device.type == "meta" for lin in linears):
            continue
        packed = torch.cat([lin.weight.detach() for lin in linears])
        for lin, part in zip(linears, packed.split([lin.weight.shape[0] for lin in linears])):
            lin.weight = nn.Parameter(part, requires_grad=lin.weight.requires_grad)
        moved = True
    return moved
