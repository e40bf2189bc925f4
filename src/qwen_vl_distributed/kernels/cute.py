"""Optional Hopper kernels written in NVIDIA's CuTe DSL, from two packages of the ``hopper`` extra
(``pip install 'qwen-vl-distributed[hopper]'``): TMA loads, warp-specialised producers and wgmma consumers, the
kind of kernel Triton does not reach at these shapes (docs/benchmarks.md, issue 21).

- ``fa4_segment_attention``: FlashAttention 4's forward (``flash_attn.cute``) for vision attention. It rounds the
  head dim up to a multiple of 16, so the vision tower's head_dim 72 runs in an 80-wide tile where cuDNN pays for
  128 (``KernelChoices.vision_backends`` with "FA4" first).
- ``quack_experts``: prompt-sized MoE experts as two variable-length grouped GEMMs (``quack``): the gate/up product
  gathers each expert's token rows itself (no sorted copy of x), and each expert's rows are one group of a
  persistent tile scheduler (``KernelChoices.quack_min_pairs``).

Neither package is a dependency: ``unavailable(what, device)`` says why a path cannot run here (not installed, no
such GPU), and the callers then run the Triton / SDPA paths. Both compile their kernels on first use (seconds per
new kernel variant, cached by the packages), which the warm-up before serving or capture pays. Numerics: each keeps
the reference's roundings where they are visible (the experts' bf16 gate/up output before the activation, the
routed weight after the down product); the sums inside a product run in the kernels' own order.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

# what -> (module to import, the package that provides it)
PACKAGES = {"fa4": ("flash_attn.cute", "flash-attn-4"), "quack": ("quack.gemm_interface", "quack-kernels")}
# compute capabilities both packages build Hopper / Blackwell kernels for
MAJORS = (9, 10)
# the activation dtypes each path takes (others run the usual path without a word)
DTYPES = {"fa4": (torch.bfloat16, torch.float16), "quack": (torch.bfloat16,)}


@functools.lru_cache(maxsize=None)
def _import_error(what: str) -> str | None:
    module, package = PACKAGES[what]
    try:
        __import__(module)
    except Exception as e:  # ImportError, or a package whose native part fails to load here
        return (f"{package} is not usable ({type(e).__name__}: {str(e)[:160]}); "
                f"pip install 'qwen-vl-distributed[hopper]'")
    return None


def unavailable(what: str, device) -> str | None:
    """None where path ``what`` ("fa4" or "quack") runs on ``device``; else why not, in one line."""
    if what not in PACKAGES:
        raise ValueError(f"unknown CuTe path {what!r}: one of {sorted(PACKAGES)}")
    device = torch.device(device)
    if device.type != "cuda":
        return f"{PACKAGES[what][1]} runs on CUDA GPUs, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in MAJORS:
        return f"{PACKAGES[what][1]} builds kernels for compute capability 9.x / 10.x, this GPU is {major}.{minor}"
    return _import_error(what)


_warned: set[str] = set()


def chosen_runs(what: str, x: torch.Tensor, purpose: str) -> bool:
    """Whether path ``what``, chosen for ``purpose``, runs on x: a CUDA tensor of a dtype it takes, on a GPU where
    ``unavailable`` finds nothing in the way. Where the GPU or the package is the reason it does not, one warning per
    reason says so, and the caller runs its usual path (CPU tensors and other dtypes take that path silently)."""
    if not x.is_cuda or x.dtype not in DTYPES[what]:
        return False
    why = unavailable(what, x.device)
    if why is not None and why not in _warned:
        _warned.add(why)
        warnings.warn(f"{purpose}: {PACKAGES[what][1]} was chosen but {why}; running the usual path", stacklevel=3)
    return why is None


def first_output(out):
    """The output tensor of a FlashAttention 4 call (which returns it with its log-sum-exp, or alone)."""
    return out[0] if isinstance(out, tuple) else out


# ------------------------------------------------------------------------------------------------------------------
# Vision attention


def fa4_segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], scale: float,
                          per_segment: bool = False) -> torch.Tensor:
    """q, k, v [N, heads, d] (any strides with d contiguous) -> [N, heads, d]: attention inside each segment
    [cu_seqlens[i], cu_seqlens[i + 1]). One varlen launch for several segments; ``per_segment`` (what a CUDA graph
    may hold: the varlen call copies cu_seqlens to the device) or one segment: one dense launch per segment."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    if per_segment or len(cu_seqlens) == 2:
        if len(cu_seqlens) == 2:
            return first_output(flash_attn_func(q[None], k[None], v[None], softmax_scale=scale))[0]
        out = torch.empty_like(q)
        for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            if b > a:
                out[a:b] = first_output(flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], softmax_scale=scale))[0]
        return out
    cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=q.device)
    longest = max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
    return first_output(flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                                         max_seqlen_k=longest, softmax_scale=scale))


# ------------------------------------------------------------------------------------------------------------------
# Experts


def quack_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, tuned: bool = False) -> torch.Tensor:
    """Same function as ``model.moe.reference_experts`` for weights in x's dtype: x [T, H], topk [T, K], gate_up
    [E, 2I, H], down [E, H, I] -> [T, H]. The pairs sorted by expert are the groups of two variable-length GEMMs:
    z = x[token] @ gate_up[e]^T (the rows gathered by index inside the kernel), h = silu(z_gate) * z_up in x's
    dtype as the reference rounds it, y = h @ down[e]^T; then ``grouped.unsort_sum``. Pairs of experts held
    elsewhere (id E) sort last, past every group: their rows are never computed, and add nothing. ``tuned``: let
    quack time its tile configs on first use of each shape (seconds); else its default config."""
    from quack.gemm_interface import gemm

    from .grouped import sorted_pairs, unsort_sum

    k = topk_ids.shape[1]
    experts, _, inter = down.shape
    order, ends = sorted_pairs(topk_ids, experts)
    cu = torch.cat([ends.new_zeros(1), ends])
    rows = (order // k).to(torch.int32)  # each sorted pair's token row of x
    z = gemm(x, gate_up.transpose(1, 2), cu_seqlens_m=cu, A_idx=rows, tuned=tuned)  # [P, 2I]
    h = F.silu(z[:, :inter]) * z[:, inter:]
    y = gemm(h, down.transpose(1, 2), cu_seqlens_m=cu, tuned=tuned)  # [P, H]
    return unsort_sum(y, order, topk_ids, topk_w, experts, x.dtype)
