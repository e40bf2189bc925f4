"""FP8-resident experts (``--fp8-experts keep``): an fp8 checkpoint's experts stay fp8 in memory with their block
scales, and every path computes with exactly the weights that dequantising at load time gives."""

from __future__ import annotations

import pytest
import torch

from checkpoint_testlib import L, edit_shard, odd_cfg, shard_of, small_cfg, stage_model
from paged import prompt_cache
from qwen_vl_distributed.checkpoint import errors as E
from qwen_vl_distributed.checkpoint.index import open_checkpoint
from qwen_vl_distributed.checkpoint.loader import load_stage
from qwen_vl_distributed.checkpoint.synth_weights import write_synthetic_weights
from qwen_vl_distributed.errors import UserError
from qwen_vl_distributed.model.config import QuantizationConfig
from qwen_vl_distributed.model.moe import reference_experts
from qwen_vl_distributed.model.quant import FP8_DTYPE, dequantize_blockwise, quantize_blockwise, quantize_experts

BLOCK = (16, 16)


def _with_block(cfg, block):
    import dataclasses

    return dataclasses.replace(cfg, quantization=QuantizationConfig(weight_block_size=block))


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    """Per-expert fp8 (as the releases), expert width 24: partial 16-row blocks in gate and up."""
    d = tmp_path_factory.mktemp("fp8res")
    write_synthetic_weights(d, odd_cfg(BLOCK), seed=7, layout="per-expert", fp8=True, shard_bytes=200_000)
    return d


def _load(d, keep: bool, **stage):
    ckpt = open_checkpoint(d)
    m = stage_model(ckpt.cfg, **stage)
    if keep:
        m.keep_experts_fp8(ckpt.cfg.quantization.weight_block_size)
    load_stage(m, ckpt, progress=False)
    return m.eval()


def _logits(m, ids):
    cache, layout = prompt_cache(m, len(ids))
    pos = torch.arange(len(ids)).expand(3, -1)
    with torch.no_grad():
        return m(positions=pos, layout=layout, cache=cache, input_ids=torch.tensor(ids))


def test_resident_experts_are_the_stored_bytes_and_scales(fp8_dir):
    m = _load(fp8_dir, True, layers=(1, 3), vision=False, embed=False, head=False)
    p = dict(m.named_parameters())
    gu, dn = p[L + "2.mlp.experts.gate_up_proj"], p[L + "2.mlp.experts.down_proj"]
    assert gu.dtype == dn.dtype == FP8_DTYPE and gu.shape == (8, 48, 64)
    assert p[L + "2.mlp.experts.gate_up_proj_scale_inv"].shape == (8, 2, 2, 4)   # gate / up: 2 row blocks of 24
    assert p[L + "1.self_attn.q_proj.weight"].dtype == torch.float32             # attention: dequantised
    from test_checkpoint_fp8 import _stored

    for e in (0, 5):
        for half, proj in enumerate(("gate_proj", "up_proj")):
            key = f"{L}2.mlp.experts.{e}.{proj}.weight"
            rows = slice(24 * half, 24 * half + 24)
            assert torch.equal(gu[e, rows].view(torch.uint8), _stored(fp8_dir, key).view(torch.uint8))
            assert torch.equal(p[L + "2.mlp.experts.gate_up_proj_scale_inv"][e, half],
                               _stored(fp8_dir, key + "_scale_inv"))
        key = f"{L}2.mlp.experts.{e}.down_proj.weight"
        assert torch.equal(dn[e].view(torch.uint8), _stored(fp8_dir, key).view(torch.uint8))
        assert torch.equal(p[L + "2.mlp.experts.down_proj_scale_inv"][e], _stored(fp8_dir, key + "_scale_inv"))


def test_resident_model_equals_dequantised_model_exactly(fp8_dir):
    kept, deq = _load(fp8_dir, True), _load(fp8_dir, False)
    ids = [3, 17, 99, 5, 250, 8, 8, 40]
    assert torch.equal(_logits(kept, ids), _logits(deq, ids))
    # and each expert, dequantised as it is used, is the loaded weight
    a, b = kept.model.language_model.layers["3"].mlp.experts, deq.model.language_model.layers["3"].mlp.experts
    for e in range(8):
        gu, dn = a.scales.dequantize(e, a.gate_up_proj, a.down_proj, torch.float32)
        assert torch.equal(gu, b.gate_up_proj[e]) and torch.equal(dn, b.down_proj[e])


def _fuse_layer_experts(d, layer: int, block) -> None:
    """Rewrite ``layer``'s per-expert fp8 tensors as one fused hf-layout pair (gate_up [E, 2I, H], down [E, H, I]),
    quantised afresh in ``block`` blocks over the fused rows."""
    from test_checkpoint_fp8 import _stored

    ckpt = open_checkpoint(d)
    e_count = ckpt.cfg.text.num_experts
    deq = lambda k: dequantize_blockwise(_stored(d, k), _stored(d, k + "_scale_inv"), block, torch.float32)
    pre = f"{L}{layer}.mlp.experts."
    gate_up = torch.stack([torch.cat([deq(f"{pre}{e}.gate_proj.weight"), deq(f"{pre}{e}.up_proj.weight")])
                           for e in range(e_count)])
    down = torch.stack([deq(f"{pre}{e}.down_proj.weight") for e in range(e_count)])
    new = {}
    for name, w in (("gate_up_proj", gate_up), ("down_proj", down)):
        q, s = quantize_blockwise(w, block)
        new[pre + name], new[pre + name + "_scale_inv"] = q, s
    for k in [k for k in ckpt.weight_map if k.startswith(pre)]:
        edit_shard(d, k, lambda t, k=k: t.pop(k))
    edit_shard(d, f"{L}{layer}.input_layernorm.weight", lambda t: t.update(new))


def test_fused_fp8_experts_stay_resident_when_blocks_align(tmp_path):
    """A fused fp8 tensor's scale blocks split into gate's and up's when the expert width (32) is a multiple of the
    block rows (16); the model still equals the dequantised one."""
    write_synthetic_weights(tmp_path, _with_block(small_cfg(), BLOCK), seed=2, layout="per-expert", fp8=True,
                            shard_bytes=1 << 30)
    _fuse_layer_experts(tmp_path, 2, BLOCK)
    kept, deq = _load(tmp_path, True), _load(tmp_path, False)
    assert kept.model.language_model.layers["2"].mlp.experts.gate_up_proj.dtype == FP8_DTYPE
    ids = [1, 2, 3, 400, 5]
    assert torch.equal(_logits(kept, ids), _logits(deq, ids))


def test_fused_fp8_experts_with_straddling_blocks_are_refused_resident(tmp_path):
    write_synthetic_weights(tmp_path, odd_cfg(BLOCK), seed=2, layout="per-expert", fp8=True, shard_bytes=1 << 30)
    _fuse_layer_experts(tmp_path, 1, BLOCK)
    key = L + "1.mlp.experts.gate_up_proj"
    with pytest.raises(E.LayoutError) as e:
        _load(tmp_path, True, layers=(1, 2), vision=False, embed=False, head=False)
    assert str(e.value) == (f"{key} in {shard_of(tmp_path, key)} cannot stay fp8 in memory: the expert width 24 is "
                            f"not a multiple of the block's 16 rows, so a block of the fused tensor holds both gate "
                            f"and up rows; run with --fp8-experts dequantize")
    _load(tmp_path, False, layers=(1, 2), vision=False, embed=False, head=False)  # dequantising loads it


def test_resident_expert_stored_unquantised_is_a_named_error(tmp_path):
    write_synthetic_weights(tmp_path, odd_cfg(BLOCK), seed=2, layout="per-expert", fp8=True, shard_bytes=1 << 30)
    key = L + "0.mlp.experts.3.down_proj.weight"

    def unquantise(t):
        t[key] = dequantize_blockwise(t[key], t.pop(key + "_scale_inv"), BLOCK, torch.float32)

    path = edit_shard(tmp_path, key, unquantise)
    with pytest.raises(E.DtypeError) as e:
        _load(tmp_path, True, layers=(0, 1), vision=False, embed=False, head=False)
    assert str(e.value) == (f"{key} in {path} is stored as F32, but stage (layer 0) keeps "
                            f"{L}0.mlp.experts.down_proj in fp8: run with --fp8-experts dequantize")


def test_resident_experts_made_for_another_block_size_are_refused_before_loading(fp8_dir):
    ckpt = open_checkpoint(fp8_dir)
    m = stage_model(ckpt.cfg, layers=(0, 1), vision=False, embed=False, head=False)
    m.keep_experts_fp8((32, 32))
    key = L + "0.mlp.experts.gate_up_proj"
    with pytest.raises(E.ConfigMismatchError) as e:
        load_stage(m, ckpt, progress=False)
    assert str(e.value) == (f"config mismatch: stage (layer 0) keeps {key} in fp8 with scales [8, 2, 1, 2], but "
                            f"{ckpt.config_path}'s weight_block_size [16, 16] gives [8, 2, 2, 4]")


def test_w8a8_reference_is_the_scaled_sum_of_exact_fp8_products():
    """model.quant.w8a8_linear against the same sum in float64 from its definition: inputs rounded per token and
    group (an all-zero group has scale 1), weights per block (partial blocks: 40 columns in groups of 16)."""
    from qwen_vl_distributed.model.quant import FP8_MAX, quantize_activations, w8a8_linear

    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 40, generator=g) * 3, torch.randn(24, 40, generator=g)
    x[1, 16:32] = 0
    wq, ws = quantize_blockwise(w, BLOCK)
    xq, xs = quantize_activations(x, BLOCK[1])
    assert xs.shape == (6, 3) and xs[1, 1] == 1 and (xq.float().abs().amax(-1) == FP8_MAX).all()
    expand = lambda s, n: s.double().repeat_interleave(16, -1)[..., :n]  # noqa: E731
    x_deq = xq.double() * expand(xs, 40)
    w_deq = wq.double() * expand(ws.repeat_interleave(16, 0)[:24], 40)
    out = w8a8_linear(x, wq, ws, BLOCK)
    assert out.dtype == x.dtype and torch.allclose(out.double(), x_deq @ w_deq.T, rtol=1e-5, atol=1e-5)
    assert (x_deq - x.double()).abs().max() <= (x.abs().amax() / 448 * 16)  # at most one e4m3 step of the max


def test_reference_experts_dequantise_each_expert_as_loading_would():
    g = torch.Generator().manual_seed(0)
    e, i, h, t, k = 4, 24, 40, 9, 2
    gate_up = torch.randn(e, 2 * i, h, generator=g) * 0.1
    down = torch.randn(e, h, i, generator=g) * 0.1
    gate_up_fp8, dq, scales = quantize_experts(gate_up, down, BLOCK)
    (gq, uq), (gs, us), ds = gate_up_fp8.split(i, 1), scales.gate_up.unbind(1), scales.down
    x = torch.randn(t, h, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w = torch.softmax(torch.randn(t, k, generator=g), -1).to(torch.bfloat16)
    deq_gu = torch.cat([dequantize_blockwise(gq, gs, BLOCK, torch.bfloat16),
                        dequantize_blockwise(uq, us, BLOCK, torch.bfloat16)], 1)
    ref = reference_experts(x, ids, w, deq_gu, dequantize_blockwise(dq, ds, BLOCK, torch.bfloat16))
    out = reference_experts(x, ids, w, gate_up_fp8, dq, scales)
    assert torch.equal(out, ref)


def test_engine_options_keep_or_dequantize(fp8_dir):
    """The run option decides the residency; the plan counts fp8 experts only when they are kept (bf16 runs)."""
    from qwen_vl_distributed.engine.build import RunOptions, build_runtime, fp8_block, make_plan

    ckpt = open_checkpoint(fp8_dir)
    outs = {}
    for mode in ("keep", "w8a8", "dequantize"):
        opts = RunOptions(model=str(fp8_dir), fp8_experts=mode, max_batch=1, max_len=64)
        rt = build_runtime(ckpt, make_plan(ckpt.cfg, opts), 0, torch.device("cpu"), opts)
        experts = rt.model.model.language_model.layers["0"].mlp.experts
        assert (experts.gate_up_proj.dtype == FP8_DTYPE) == (mode != "dequantize")
        assert experts.fp8_act_quant == (mode == "w8a8")
        outs[mode] = _logits(rt.model, [9, 8, 7, 6])
    assert torch.equal(outs["keep"], outs["dequantize"])
    # W8A8 rounds the experts' inputs to fp8 as well: other logits, near the dequantised weights' ones
    diff = ((outs["w8a8"] - outs["keep"]).norm() / outs["keep"].norm()).item()
    assert 1e-4 < diff < 0.1, diff
    bf16 = RunOptions(model=str(fp8_dir), dtype="bfloat16", fp8_experts="keep")
    assert fp8_block(ckpt.cfg, bf16) == BLOCK and make_plan(ckpt.cfg, bf16).dtype == "fp8"
    bf16.fp8_experts = "dequantize"
    assert fp8_block(ckpt.cfg, bf16) is None and make_plan(ckpt.cfg, bf16).dtype == "bf16"
    bf16.fp8_experts = "auto"  # keep only where the fp8 kernels run: not on a CPU
    assert fp8_block(ckpt.cfg, bf16) is None
    bf16.fp8_experts = "yes"
    with pytest.raises(UserError, match="--fp8-experts 'yes': choose one of auto, keep, w8a8, dequantize"):
        fp8_block(ckpt.cfg, bf16)
    for mode in ("dequantize", "w8a8"):
        assert _worker_options(RunOptions(model="x", fp8_experts=mode)).fp8_experts == mode


def _worker_options(opts):
    """What a stage process started with ``opts.worker_argv`` parses back as its options."""
    from qwen_vl_distributed.cli.main import build_parser
    from qwen_vl_distributed.engine.build import RunOptions

    args = build_parser().parse_args(opts.worker_argv(1, 2, "tcp://h:1"))
    return RunOptions.from_json(args.options)


def test_random_weight_benchmarks_can_keep_their_experts_in_fp8():
    """bench-pipeline --fp8: random weights, experts quantised and kept fp8 on every stage (workers are told)."""
    from qwen_vl_distributed.engine.build import RunOptions, build_runtime, make_plan, open_source

    opts = RunOptions(model=None, random_preset="tiny", random_layers=4, random_fp8=True, max_batch=1, max_len=32,
                      fp8_experts="keep")
    src = open_source(opts)
    rt = build_runtime(src, make_plan(src.cfg, opts), 0, torch.device("cpu"), opts)
    experts = rt.model.model.language_model.layers["1"].mlp.experts
    assert experts.gate_up_proj.dtype == FP8_DTYPE and experts.fp8_block == (128, 128)
    assert torch.isfinite(_logits(rt.model, [1, 2, 3])).all()
    assert _worker_options(opts) == opts
