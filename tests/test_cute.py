"""The optional CuTe-DSL paths (kernels/cute.py) on CPU: where they cannot run they say why and are not chosen, the
choices that name them are checked, and our glue around each package's call is held to the reference through a
stand-in that computes what the package documents its call computes (flash_attn.cute's varlen / dense forward,
quack's variable-length GEMM with gathered rows). The packages' own kernels run only on a GPU:
tests/gpu/test_cute_gpu.py holds them to the references there."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from qwen_vl_distributed.kernels import cute
from qwen_vl_distributed.kernels.choices import KernelChoices
from qwen_vl_distributed.kernels.grouped import fast_experts
from qwen_vl_distributed.model.moe import reference_experts
from qwen_vl_distributed.model.vision import reference_segment_attention


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_unavailable_says_why_on_cpu_and_names_only_known_paths():
    for what in ("fa4", "quack"):
        assert "CUDA" in cute.unavailable(what, "cpu")
    with pytest.raises(ValueError, match="unknown CuTe path"):
        cute.unavailable("fa3", "cpu")


def test_choices_check_the_names_they_are_given():
    KernelChoices(vision_backends=("FA4", "CUDNN_ATTENTION"), quack_min_pairs=4096)
    with pytest.raises(ValueError, match="vision_backends.*FA5"):
        KernelChoices(vision_backends=("FA5",))
    with pytest.raises(ValueError, match="quack_min_pairs"):
        KernelChoices(quack_min_pairs=-1)
    with pytest.raises(ValueError, match="FA4 runs only first"):
        KernelChoices(vision_backends=("CUDNN_ATTENTION", "FA4"))


def test_quack_is_never_chosen_off_a_gpu_or_when_off():
    from qwen_vl_distributed.kernels.grouped import quack_runs

    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    assert not quack_runs(x, 4096, KernelChoices(quack_min_pairs=1))  # a CPU tensor
    assert not quack_runs(x, 4096, KernelChoices())  # off by default


def test_quack_chosen_on_cpu_runs_the_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=g)
    ids = torch.randint(0, 4, (6, 2), generator=g)
    w = torch.rand(6, 2, generator=g)
    gate_up, down = torch.randn(4, 32, 32, generator=g), torch.randn(4, 32, 16, generator=g)
    got = fast_experts(x, ids, w, gate_up, down, choices=KernelChoices(quack_min_pairs=1))
    assert torch.equal(got, reference_experts(x, ids, w, gate_up, down))


# -- stand-ins for the packages' calls ------------------------------------------------------------------------------


def _fake_gemm(A, B, cu_seqlens_m=None, A_idx=None, tuned=True):
    """quack.gemm_interface.gemm with varlen_m: output row r of group l (cu[l] <= r < cu[l + 1]) is A[A_idx[r]]
    (or A[r]) @ B[l]; rows past cu[-1] are never written (nan here, so that a caller reading them fails)."""
    assert cu_seqlens_m is not None and cu_seqlens_m.dtype == torch.int32 and B.dim() == 3
    assert cu_seqlens_m.numel() == B.shape[0] + 1 and int(cu_seqlens_m[0]) == 0
    rows = A[A_idx.long()] if A_idx is not None else A
    assert A_idx is None or A_idx.dtype == torch.int32
    out = torch.full((rows.shape[0], B.shape[-1]), float("nan"), dtype=A.dtype)
    cu = cu_seqlens_m.tolist()
    for e, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        out[a:b] = (rows[a:b].float() @ B[e].float()).to(A.dtype)
    return out


def _fake_attention(q, k, v, scale):  # [S, heads, d] each
    o = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None].float() for t in (q, k, v)), scale=scale)
    return o[0].transpose(0, 1).to(q.dtype)


def _fake_flash_attn_func(q, k, v, softmax_scale=None):
    assert q.dim() == 4 and q.stride(-1) == 1
    return torch.stack([_fake_attention(q[i], k[i], v[i], softmax_scale) for i in range(q.shape[0])]), None


def _fake_flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                                 max_seqlen_k=None, softmax_scale=None):
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32 and q.dim() == 3
    cu = cu_seqlens_q.tolist()
    assert max_seqlen_q == max_seqlen_k == max(b - a for a, b in zip(cu[:-1], cu[1:]))
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1], cu[1:]):
        out[a:b] = _fake_attention(q[a:b], k[a:b], v[a:b], softmax_scale)
    return out, None


@pytest.fixture
def fake_packages(monkeypatch):
    quack, gi = types.ModuleType("quack"), types.ModuleType("quack.gemm_interface")
    gi.gemm = _fake_gemm
    fa, fc = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    fc.flash_attn_func, fc.flash_attn_varlen_func = _fake_flash_attn_func, _fake_flash_attn_varlen_func
    for name, mod in (("quack", quack), ("quack.gemm_interface", gi), ("flash_attn", fa), ("flash_attn.cute", fc)):
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.mark.parametrize("t,k,e,held_elsewhere", [(1, 2, 4, False), (37, 4, 8, False), (37, 4, 8, True),
                                                  (64, 8, 16, True)])
def test_quack_experts_glue_matches_the_reference(fake_packages, t, k, e, held_elsewhere):
    """Pairs sorted by expert with the row of x each gathers, each expert's group bounds, the activation between the
    products, and the unsort + routed weight + K-sum; experts with no tokens, and pairs of experts held elsewhere
    (id E: their rows are past every group and must add nothing)."""
    g = torch.Generator().manual_seed(t + e)
    h, i = 32, 16
    x = torch.randn(t, h, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids[:, 0] = torch.where(ids[:, 0] == 3, 2, ids[:, 0])  # (expert 3: only as a later pick)
    if held_elsewhere:
        ids[::3, 1] = e
    w = torch.softmax(torch.randn(t, k, generator=g), -1)
    gate_up, down = 0.3 * torch.randn(e, 2 * i, h, generator=g), 0.3 * torch.randn(e, h, i, generator=g)
    got = cute.quack_experts(x, ids, w, gate_up, down)
    want = reference_experts(x, ids, w, gate_up, down)
    assert not got.isnan().any()
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("cu", [[0, 50], [0, 17, 50], [0, 1, 1, 33, 50]])
@pytest.mark.parametrize("per_segment", [False, True])
def test_fa4_segment_attention_glue_matches_the_reference(fake_packages, cu, per_segment):
    """One segment (one dense call), several (one varlen call), and per segment (what a CUDA graph holds, empty
    segments skipped), on strided [N, heads, d] views of one qkv buffer as the vision tower passes them."""
    g = torch.Generator().manual_seed(len(cu))
    n, heads, d = cu[-1], 3, 72
    qkv = torch.randn(n, 3, heads, d, generator=g)
    q, k, v = qkv.unbind(1)
    got = cute.fa4_segment_attention(q, k, v, cu, d**-0.5, per_segment=per_segment)
    assert rel(got, reference_segment_attention(q, k, v, cu, d**-0.5)) < 1e-5


def test_the_report_shows_the_cute_paths_or_why_they_did_not_run():
    from qwen_vl_distributed.bench.report import render

    q = {"experts_dispatched_ms": 1.6, "experts_quack_ms": 1.2, "experts_quack_tuned_ms": 1.1,
         "experts_dispatched_rel_vs_reference": 4e-3, "experts_quack_rel_vs_reference": 5e-3,
         "experts_quack_tuned_rel_vs_reference": 5e-3, "quack_ms_layer": 2.2, "quack_layer_vs_dispatched": 0.9}
    attention = {"CUDNN_ATTENTION": "unsupported: no plan", "FA4": 0.12, "prompt_triton_extend_ms": 0.2,
                 "prompt_sdpa_ms": 0.15, "prompt_rel_triton_vs_sdpa": 1e-3, "chunk_triton_extend_ms": 0.3,
                 "chunk_sdpa_ms": 0.25, "chunk_rel_triton_vs_sdpa": 1e-3, "prompt_fa4_ms": 0.11,
                 "prompt_rel_fa4_vs_sdpa": 2e-3, "chunk_fa4_ms": 0.2, "chunk_rel_fa4_vs_sdpa": 2e-3}
    missing = "quack-kernels is not usable"
    rows = {2048: {"ours_ms_layer": 2.5, "quack": q}, 8192: {"ours_ms_layer": 9.0, "quack": missing}}
    text = render({"prefill": rows,
                   "prefill_attention": {2048: attention},
                   "vision": {"grid": [1, 64, 64], "fa4": "failed: AssertionError: x", "fp8_linears_graph_ms": 9.5,
                              "rel_fp8_linears_vs_bf16": 0.09, "attention_only_ms": {"CUDNN_ATTENTION": 0.22,
                                                                                       "FA4": "failed: x"},
                              "backend_orders_ms": {"default": 14.0}}})
    assert "as dispatched / quack / quack tuned: 1.600 / 1.200 / 1.100" in text
    assert "layers with quack 2.200 ms/L = 0.900 of as dispatched" in text
    assert "T=8192: quack experts not run: quack-kernels is not usable" in text
    assert "whole prompt 0.110 ms" in text and "cuDNN unsupported: no plan" in text
    assert "FA4: failed: AssertionError: x" in text and "graph 9.500 ms" in text and "rel vs bf16 9.0e-02" in text
