"""``--vision-fp8``: the vision tower's block linears in fp8, one scale per weight row and per input row
(model.quant.Fp8Linear). The reference is held to torch._scaled_mm's own row-wise product (an implementation we did
not write), the Triton input quantisation (kernels/fp8_linear.py, in Triton's interpreter here) to the reference's
bits, the tower to its bf16 self within fp8's rounding, and the run option to what it promises and refuses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from qwen_vl_distributed.errors import UserError
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.model.quant import FP8_DTYPE, Fp8Linear, quantize_activations, rowwise_fp8_linear
from synth_model import tiny_model_dir

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable here")
BF16 = torch.bfloat16


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def linear(k: int, n: int, seed: int = 0, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias).to(BF16)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 3.0, n, dtype=BF16)[:, None])  # rows of different ranges
    return lin


@pytest.mark.parametrize("bias", [True, False])
def test_reference_is_the_row_wise_scaled_product(bias):
    lin = linear(96, 48, bias=bias)
    f8 = Fp8Linear.from_linear(lin, "fc")
    assert f8.weight.dtype == FP8_DTYPE and f8.weight_scale.shape == (48,)
    x = torch.randn(2, 7, 96, dtype=BF16) * torch.linspace(0.1, 4.0, 7, dtype=BF16)[:, None]  # rows' ranges differ
    got = f8(x)
    xq, xs = quantize_activations(x.reshape(-1, 96), 96)
    want = torch._scaled_mm(xq, f8.weight.t(), scale_a=xs, scale_b=f8.weight_scale[None, :],
                            bias=f8.bias, out_dtype=BF16).reshape(2, 7, 48)
    assert got.shape == want.shape and rel(got, want) < 2e-3  # (fp32 sums in another order, then one rounding)
    err = rel(got, lin(x))  # fp8's 4 significant bits on both operands, against the bf16 linear
    assert 5e-3 < err < 0.08, err


def test_gelu_before_the_second_linear():
    lin = linear(64, 32, seed=1)
    f8 = Fp8Linear.from_linear(lin)
    x = torch.randn(5, 64, dtype=BF16)
    assert torch.equal(f8(x, act="tanh"), f8(F.gelu(x, approximate="tanh")))
    assert torch.equal(f8(x, act="none"), f8(F.gelu(x)))


def test_dims_that_are_not_multiples_of_16_are_refused_by_name():
    with pytest.raises(ValueError, match=r"visual.blocks.3.qkv: fp8 needs both dims a multiple of 16.*\[48, 40\]"):
        Fp8Linear.from_linear(linear(40, 48), "visual.blocks.3.qkv")


@needs_triton
@pytest.mark.parametrize("n,k", [(1, 32), (5, 48), (9, 1152), (3, 4304)])
def test_triton_row_quantisation_gives_the_reference_bits(n, k):
    from qwen_vl_distributed.kernels.fp8_linear import row_quant

    g = torch.Generator().manual_seed(n * k)
    x = (torch.randn(n, k, generator=g) * torch.logspace(-3, 2, n)[:, None]).to(BF16)
    x[0, : k // 2] = 0.0  # a row half zero (and with n = 1, the only row)
    q, s = row_quant(x)
    wq, ws = quantize_activations(x, k)
    assert torch.equal(q.float(), wq.float()) and torch.equal(s, ws)
    # with the MLP's tanh-GELU first: Triton's formula and torch's round to bf16 apart in rare last bits
    q, s = row_quant(x, gelu_tanh=True)
    wq, ws = quantize_activations(F.gelu(x, approximate="tanh"), k)
    assert (q.float() == wq.float()).float().mean() > 0.99 and rel(q.float() * s, wq.float() * ws) < 1e-2


@needs_triton
def test_the_gpu_pieces_compute_the_reference():
    """kernels.fp8_linear's row quantisation + torch._scaled_mm (the CPU's, here) against rowwise_fp8_linear, with
    the bias in _scaled_mm's epilogue and, where a torch refuses that, added after."""
    from qwen_vl_distributed.kernels import fp8_linear as fl

    f8 = Fp8Linear.from_linear(linear(4304, 64, seed=2))
    x = torch.randn(6, 4304, dtype=BF16)
    want = rowwise_fp8_linear(x, f8.weight, f8.weight_scale, f8.bias, "tanh")
    q, s = fl.row_quant(x, gelu_tanh=True)
    assert rel(fl.scaled_mm(q, s, f8.weight, f8.weight_scale, f8.bias, BF16), want) < 1e-2
    fl._bias_in_epilogue[x.device] = False
    try:
        assert rel(fl.scaled_mm(q, s, f8.weight, f8.weight_scale, f8.bias, BF16), want) < 1e-2
    finally:
        fl._bias_in_epilogue.pop(x.device)


@pytest.fixture(scope="module")
def towers():
    from qwen_vl_distributed.bench.models import random_vision_tower

    tower = random_vision_tower(preset("tiny"), "cpu", BF16, seed=3)
    f8 = copy.deepcopy(tower)
    f8.quantize_linears_fp8()
    return tower, f8


def test_quantised_tower_stays_near_the_bf16_tower(towers):
    tower, f8 = towers
    assert f8.fp8_linears and not tower.fp8_linears
    for block in f8.blocks:
        assert all(isinstance(m, Fp8Linear) for m in (block.attn.qkv, block.attn.proj, block.mlp.linear_fc1,
                                                       block.mlp.linear_fc2))
    assert isinstance(f8.merger.linear_fc1, torch.nn.Linear)  # the mergers stay in bf16
    grids = [(1, 8, 12), (1, 4, 4)]
    px = torch.randn(sum(t * h * w for t, h, w in grids), tower.cfg.patch_dim, dtype=BF16)
    with torch.no_grad():
        (a, taps_a), (b, taps_b) = tower(px, grids), f8(px, grids)
    assert 1e-3 < rel(b, a) < 0.1, rel(b, a)
    assert all(rel(y, x) < 0.1 for x, y in zip(taps_a, taps_b))


@needs_triton
def test_fused_block_with_fp8_linears_equals_the_module_block(towers):
    """kernels/vision_block.py's fused forward (LayerNorm kernels, the GELU inside fc2's quantisation) on an fp8
    block, in Triton's interpreter, against the block's own forward."""
    from qwen_vl_distributed.kernels.vision_block import fused_block_forward
    from qwen_vl_distributed.model.rope import vision_rope_tables

    _, f8 = towers
    block, cfg = f8.blocks[0], f8.cfg
    n = 40
    x = torch.randn(n, cfg.hidden_size, dtype=BF16)
    idx = torch.arange(n)
    rope = vision_rope_tables(idx // 8, idx % 8, cfg.head_dim, cfg.rope_theta)
    with torch.no_grad():
        assert rel(fused_block_forward(block, x, rope, [0, 24, n]), block(x, rope, [0, 24, n])) < 2e-2


def test_run_option_quantises_the_stage_holding_the_tower(tmp_path_factory):
    from qwen_vl_distributed.checkpoint.index import open_checkpoint
    from qwen_vl_distributed.cli.main import build_parser
    from qwen_vl_distributed.engine.build import RunOptions, build_runtime, check_vision_fp8, fingerprint, make_plan

    d = tiny_model_dir(tmp_path_factory)
    ckpt = open_checkpoint(d)
    opts = RunOptions(model=d, vision_fp8=True, max_batch=1, max_len=64, stages=2)
    plan = make_plan(ckpt.cfg, opts)
    first = build_runtime(ckpt, plan, 0, torch.device("cpu"), opts)
    assert first.model.model.visual.fp8_linears
    off = RunOptions(model=d, max_batch=1, max_len=64, stages=2)
    assert not build_runtime(ckpt, plan, 0, torch.device("cpu"), off).model.model.visual.fp8_linears
    grid = opts.grid(ckpt.cfg)
    assert fingerprint(ckpt, plan, grid, opts) != fingerprint(ckpt, plan, grid, off)  # ranks must agree on it
    args = build_parser().parse_args(opts.worker_argv(1, 2, "tcp://h:1"))
    assert RunOptions.from_json(args.options).vision_fp8
    with pytest.raises(UserError, match="--vision-fp8 on cuda runs with --dtype bfloat16"):
        check_vision_fp8(RunOptions(model=d, device="cuda", dtype="float32", vision_fp8=True))
    gen = build_parser().parse_args(["generate", "--model", d, "--prompt", "hi", "--vision-fp8"])
    assert gen.vision_fp8


@needs_triton
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_writes_the_fp8_linears_input(residual):
    """kernels/vision_block.py's LayerNorm with ``quant``: the normalised rows in the input dtype, quantised per row
    (what an fp8 linear would do with them), and the residual sum as without it."""
    from qwen_vl_distributed.kernels.vision_block import layer_norm

    g = torch.Generator().manual_seed(7)
    d = 48  # (not a power of two: the masked columns must not move the rows' amax)
    norm = torch.nn.LayerNorm(d, eps=1e-6).to(BF16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g))
        norm.bias.copy_(torch.randn(d, generator=g))
    x = torch.randn(9, d, generator=g).to(BF16)
    r = torch.randn(9, d, generator=g).to(BF16) if residual else None
    s, (q, sc) = layer_norm(x, norm, residual=r, quant=True)
    s_plain, _ = layer_norm(x, norm, residual=r)
    assert torch.equal(s, s_plain) and q.dtype == FP8_DTYPE and sc.shape == (9, 1)
    wq, ws = quantize_activations(F.layer_norm(s.float(), (d,), norm.weight.float(), norm.bias.float(), 1e-6)
                                  .to(BF16), d)
    assert (q.float() == wq.float()).float().mean() > 0.97 and rel(q.float() * sc, wq.float() * ws) < 2e-2
