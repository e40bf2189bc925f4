"""Vision attention impl 'fast': the rotary and the per-segment attention of a vision block, never a dense block
mask.

Shapes: N patches (all segments packed), heads, d head_dim; cu_seqlens [n_segments + 1] segment bounds.

On CUDA the rotary is one Triton kernel (``kernels.vision_rotary``) writing q and k in the layout SDPA reads without
a copy; v is read in place from the qkv projection's output. Then one image is a single SDPA call with the fastest
Hopper backend first, and several segments go through varlen flash attention
(``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10) over the packed patches when it exists and runs here,
else one SDPA per segment. With "FA4" first in the backend order, FlashAttention 4 (kernels.cute, optional) runs
instead where it is installed: head_dim 72 in an 80-wide tile. On CPU it is the reference.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

from ..model.vision import reference_vision_attention, vision_rotary

def _backends(order: tuple[str, ...] | None):
    """SDPA backend priority for vision (non-causal, head_dim 72): ``KernelChoices.vision_backends``; None: torch's
    own choice, which measured fastest on the H200 (docs/benchmarks.md)."""
    order = [name for name in order or () if name != "FA4"]  # (FA4 is not an SDPA backend: segment_attention)
    if not order:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [getattr(SDPBackend, name) for name in order]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # a torch without set_priority: plain allow-list
        return sdpa_kernel(order)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k, v [n, heads, d] -> [n, heads, d] (SDPA's batch, seq, heads, d memory order: no copies)."""
    qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    return F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], scale: float):
    """Packed varlen attention, or None where this torch has no usable varlen_attn."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if abs(scale - q.shape[-1] ** -0.5) > 1e-12 or q.dtype not in (torch.float16, torch.bfloat16):
        return None  # only the default scale is passed positionally on every torch version
    cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=q.device)
    longest = max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
    try:
        return varlen_attn(q, k, v, cu, cu, longest, longest)
    except (RuntimeError, NotImplementedError, TypeError):
        return None


# depth > 0 inside ``graph_safe()`` (per thread): the calls a CUDA graph will hold, and their warm-up, take the
# per-segment path
_graph_safe = threading.local()


@contextlib.contextmanager
def graph_safe():
    """Run segment attention as it can be captured: one SDPA per segment (varlen needs cu_seqlens copied to the
    device, which a capture does not allow). The warm-up before a capture must run inside it too, so that the
    attention backends build their plans (cuDNN compiles and loads kernels, which allocates memory) for exactly
    the calls the capture records: a plan built during a capture invalidates it."""
    _graph_safe.depth = getattr(_graph_safe, "depth", 0) + 1
    try:
        yield
    finally:
        _graph_safe.depth -= 1


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                      scale: float, backends: tuple[str, ...] | None = None) -> torch.Tensor:
    """q, k, v [N, heads, d] -> [N, heads, d], attention inside each segment. With "FA4" first in ``backends``,
    FlashAttention 4 (kernels.cute) where it runs on this GPU and q is bf16 / fp16, else the SDPA backends that
    follow it."""
    capturable = getattr(_graph_safe, "depth", 0) or (q.is_cuda and torch.cuda.is_current_stream_capturing())
    if backends and backends[0] == "FA4":
        from .cute import chosen_runs, fa4_segment_attention

        if chosen_runs("fa4", q, "vision attention"):
            return fa4_segment_attention(q, k, v, cu_seqlens, scale, per_segment=bool(capturable))
    if not q.is_cuda or capturable:
        return per_segment_attention(q, k, v, cu_seqlens, scale, backends)
    with _backends(backends):
        if len(cu_seqlens) == 2:
            return _sdpa(q, k, v, scale)
        out = _varlen(q, k, v, cu_seqlens, scale)
        return out if out is not None else per_segment_attention(q, k, v, cu_seqlens, scale, backends)


def per_segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                          scale: float, backends: tuple[str, ...] | None = None) -> torch.Tensor:
    out = torch.empty_like(q)
    with _backends(backends) if q.is_cuda else contextlib.nullcontext():
        for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            out[a:b] = _sdpa(q[a:b], k[a:b], v[a:b], scale)
    return out


def fast_vision_attention(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cu_seqlens: list[int],
                          heads: int, scale: float, backends: tuple[str, ...] | None = None) -> torch.Tensor:
    """Same function as ``model.vision.reference_vision_attention``: qkv [N, 3*heads*d] -> [N, heads*d]."""
    if not qkv.is_cuda:
        return reference_vision_attention(qkv, rope, cu_seqlens, heads, scale)
    from .vision_rotary import rotate_qk  # Triton only where a GPU runs it

    n = qkv.shape[0]
    q, k = rotate_qk(qkv, rope, heads)
    v = qkv.view(n, 3, heads, -1)[:, 2]
    return segment_attention(q, k, v, cu_seqlens, scale, backends).reshape(n, -1)


# ------------------------------------------------------------------------------------------------------------------
# Coded segments: attention whose segments are data in device memory, so that one CUDA graph serves every grid of a
# padded patch count (runtime/vision_graph.py). q and k get ``dp - d`` more head columns holding a code of the row's
# segment: q's is one-hot, k's is 0 at its own segment and -big elsewhere, so q.k gains exactly 0 inside a segment
# and -big across (every product with a zero is an exact zero): the softmax gives keys of other segments weight
# exactly 0, and v's extra columns are 0. One dense SDPA over the padded rows then equals the per-segment attention
# up to the kernels' own summation order. cuDNN runs head_dim 72 in a 128-wide tile, so the extra columns of
# dp = 80 are free there (docs/benchmarks.md); the dense call costs rows^2, which the bucket policy bounds.


def coded_head_dim(d: int) -> int:
    """The padded head dim: at least two code columns (one segment and the padding rows), a multiple of 8."""
    return (d + 2 + 7) // 8 * 8


def coded_buffer(segment: torch.Tensor, heads: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """[3, N, heads, dp] q/k/v rows with the code columns of ``segment`` [N] (int64, < dp - d) written; columns
    [0, d) are filled per block by ``coded_attention``. Host-synchronisation free (it may be captured)."""
    n, dp = segment.shape[0], coded_head_dim(d)
    big = torch.finfo(dtype).max / 4  # finite, so that 0 * big is 0 (not nan) and big * scale stays finite
    own = torch.arange(dp - d, device=segment.device)[None, :] == segment[:, None]  # [N, dp - d]
    buf = torch.zeros(3, n, heads, dp, dtype=dtype, device=segment.device)
    buf[0, :, :, d:] = own.to(dtype)[:, None, :]
    buf[1, :, :, d:] = torch.where(own, 0.0, -big).to(dtype)[:, None, :]
    return buf


def coded_attention(buf: torch.Tensor, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], heads: int,
                    scale: float, backends: tuple[str, ...] | None = None) -> torch.Tensor:
    """Same function as ``fast_vision_attention`` with the segments coded in ``buf`` (``coded_buffer``):
    qkv [N, 3*heads*d] -> [N, heads*d]."""
    n, d = qkv.shape[0], qkv.shape[1] // (3 * heads)
    if qkv.is_cuda:
        from .vision_rotary import rotate_qkv_into  # Triton only where a GPU runs it

        rotate_qkv_into(qkv, rope, heads, buf)
    else:
        q, k, v = qkv.view(n, 3, heads, d).unbind(1)
        buf[0, :, :, :d] = vision_rotary(q, rope)
        buf[1, :, :, :d] = vision_rotary(k, rope)
        buf[2, :, :, :d] = v
    with _backends(backends) if qkv.is_cuda else contextlib.nullcontext():
        o = _sdpa(buf[0], buf[1], buf[2], scale)
    return o[:, :, :d].reshape(n, -1)


class CodedSegments:
    """A vision attention core (``VisionAttentionFn``) over the segments coded in ``buf``; the cu_seqlens it is
    passed are ignored (a bucket graph passes the padded rows as one segment)."""

    def __init__(self, buf: torch.Tensor, backends: tuple[str, ...] | None = None):
        self.buf, self.backends = buf, backends

    def __call__(self, qkv, rope, cu_seqlens, heads, scale):
        return coded_attention(self.buf, qkv, rope, heads, scale, self.backends)
