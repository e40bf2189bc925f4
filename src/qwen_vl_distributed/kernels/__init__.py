"""Fast implementations behind the model's kernel interfaces; the plain PyTorch references stay in ``model/``.

``register()`` adds the impl name 'fast' to each registry:
- experts (model.moe.EXPERTS_IMPLS): fused Triton kernel for decode sizes on CUDA, grouped GEMM for prefill
  (kernels.grouped.fast_experts), the Triton kernel at every size for fp8-resident experts; also 'grouped' and
  'triton' to force one path;
- cache attention (model.attention.CACHE_ATTENTION_IMPLS): split-KV Triton decode, one Triton launch over the cache
  for prompts, chunks and mixed steps (kernels.extend_attention), SDPA (cuDNN first) for a lone long prompt
  (kernels.attention.fast_cache_attention);
- vision attention (model.vision.VISION_ATTENTION_IMPLS): the 2-D rotary as one Triton kernel, then one SDPA /
  varlen flash per image (kernels.vision_attention.fast_vision_attention);
- the vision tower's fp8 linears where ``--vision-fp8`` made them (model.quant.FP8_LINEAR_IMPLS): a Triton row
  quantisation, then torch._scaled_mm (kernels.fp8_linear);
and the name 'fused' to the decoder-layer registry (model.decoder.DECODER_LAYER_IMPLS): the whole layer step through
the fused layer kernels (kernels.fast_forward), for every step the decode graphs do not replay.
``enable_fast_paths(model)`` registers them, selects them on a model and packs each layer's q/k/v weights into one
buffer (kernels.packing). Their tunable choices (tiles, size thresholds, backend orders) are one options object,
``kernels.choices.KernelChoices``, bound when they are registered: the defaults, or what ``qwen-vl bench`` passes.
Importing this package imports no Triton and touches no GPU: the Triton modules load on first use on a CUDA tensor,
so CPU runs and CI never need either.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ..model.attention import TextAttention, register_cache_attention
from ..model.decoder import DecoderLayer, register_decoder_layer_impl
from ..model.moe import Experts, register_experts_impl
from ..model.quant import FP8_LINEAR_IMPLS
from ..model.vision import VISION_ATTENTION_IMPLS
from .choices import DEFAULT, KernelChoices


def _triton_experts(x, topk_ids, topk_w, gate_up, down, scales=None, choices: KernelChoices = DEFAULT):
    from .moe_triton import fused_experts

    return fused_experts(x, topk_ids, topk_w, gate_up, down, scales, choices.moe_config(topk_ids.numel(), scales))


def _fp8_linear(x, weight, scale, bias, act=None):
    from ..model.quant import rowwise_fp8_linear

    if not x.is_cuda:
        return rowwise_fp8_linear(x, weight, scale, bias, act)
    from .fp8_linear import fp8_linear  # Triton only where a GPU runs it

    return fp8_linear(x, weight, scale, bias, act)


def _fused_layer(layer, h, rope, kv, layout, choices: KernelChoices = DEFAULT):
    from .fast_forward import fused_decoder_layer

    return fused_decoder_layer(layer, h, rope, kv, layout, choices)


def fp8_runs_on(device) -> bool:
    """Whether the fp8 expert kernels run on ``device``: a CUDA GPU of compute capability 8.9+ (Ada, Hopper), where
    Triton has e4m3."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_fits(scales) -> bool:
    """Whether the expert kernels take fp8 experts with these scales (model.quant.ExpertScales, or None: no fp8):
    a reduction tile must lie in one scale block, so the block's width must be a power of two of at least
    ``fp8_min_block_width`` (128 in the FP8 releases); and on a GPU, one they run on (``fp8_runs_on``)."""
    if scales is None:
        return True
    bc, dev = scales.block[1], scales.gate_up.device
    if dev.type == "cuda" and not fp8_runs_on(dev):
        return False
    return bc >= fp8_min_block_width(scales) and bc & (bc - 1) == 0


def fp8_min_block_width(scales) -> int:
    """The narrowest reduction tile of the expert kernels for these fp8 experts: 16 where the dequantised weights
    meet 16- or 32-bit activations; 32 for W8A8 (``scales.act_quant``), whose fp8 x fp8 products tl.dot takes
    32 wide at the least (a GPU refuses to compile a narrower one; the CPU interpreter does not check)."""
    return 32 if scales.act_quant else 16


def fused_layers_fit(model) -> bool:
    """Whether the fused layer kernels take this model: on CUDA, with fp8 experts (if any) in blocks the expert
    kernels take. (Every head_dim the config allows: the attention kernels pad a head's tile.)"""
    return next(model.parameters()).is_cuda and all(fp8_fits(m.scales) for m in _experts(model))


def decode_graph_safe(model) -> bool:
    """Whether a decode step of ``model`` through its modules' forward (runtime.cuda_graph when the layers are not
    fused) can be captured in a CUDA graph: 'fast' attention, whose decode path is the split-KV kernel reading the
    block tables and lengths from device tensors (every other attention path reads them from the step's host
    lists, which a capture would freeze at their capture-time values), and 'fast' or 'triton' experts on weights
    the expert kernels take (the reference loops over the experts hit, a host sync; 'grouped' is not graph-safe)."""
    attention = {m.impl for m in model.modules() if isinstance(m, TextAttention)}
    experts = _experts(model)
    return (attention <= {"fast"} and all(m.impl in ("fast", "triton") for m in experts)
            and all(fp8_fits(m.scales) for m in experts))


def _experts(model) -> list[Experts]:
    return [m for m in model.modules() if isinstance(m, Experts)]


def register(choices: KernelChoices = DEFAULT) -> None:
    """Fill the model's registries with the fast paths, bound to ``choices`` (one set per process: the last
    registration is what every model of the process runs)."""
    from .attention import fast_cache_attention
    from .grouped import fast_experts, grouped_experts
    from .vision_attention import fast_vision_attention

    bind = functools.partial
    register_experts_impl("fast", bind(fast_experts, choices=choices))
    register_experts_impl("grouped", grouped_experts)
    register_experts_impl("triton", bind(_triton_experts, choices=choices))
    register_cache_attention("fast", bind(fast_cache_attention, choices=choices))
    VISION_ATTENTION_IMPLS["fast"] = bind(fast_vision_attention, backends=choices.vision_backends)
    FP8_LINEAR_IMPLS["fast"] = _fp8_linear
    register_decoder_layer_impl("fused", bind(_fused_layer, choices=choices))


def enable_fast_paths(model, experts: str = "fast", attention: str = "fast", vision_attention: str = "fast",
                      vision_graphs: bool = True, layer: str | None = None, choices: KernelChoices = DEFAULT):
    """Register the fast implementations (bound to ``choices``) and select them on ``model`` (a Qwen3VLMoe stage),
    and (on CUDA) replay its vision tower from per-shape CUDA graphs. ``layer``: the decoder-layer impl, by default
    'fused' where ``fused_layers_fit`` and the experts and attention are 'fast' (the fused layer has those built
    in); else the modules' own forward around the chosen attention and experts. Moves the q/k/v weights
    (kernels.packing): call it before capturing graphs. Returns the model."""
    from .packing import pack_qkv

    register(choices)
    if layer is None:
        fast = experts == "fast" and attention == "fast"
        layer = "fused" if fast and fused_layers_fit(model) else "reference"
    model.set_impl(experts=experts, attention=attention, vision_attention=vision_attention, layer=layer,
                   vision_linear="fast")
    pack_qkv(model)  # one q/k/v GEMM for prompts (the parameters become views of one buffer)
    if vision_graphs and next(model.parameters()).is_cuda:
        from ..runtime.vision_graph import enable_vision_graphs

        enable_vision_graphs(model, fused_blocks=vision_attention != "reference")  # reference: module blocks
    return model


@contextlib.contextmanager
def module_layers(model):
    """Inside the block, ``model``'s decoder layers run the modules' own forward (around whichever attention and
    experts impls are selected): what the fused layers are held against."""
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    before = [layer.impl for layer in layers]
    for layer in layers:
        layer.impl = "reference"
    try:
        yield model
    finally:
        for layer, impl in zip(layers, before):
            layer.impl = impl


def use_reference(model):
    """Select the plain PyTorch references again (what the parity tests hold the fast paths against)."""
    model.set_impl(experts="reference", attention="reference", vision_attention="reference", layer="reference",
                   vision_linear="reference")
    if model.has_vision:
        model.model.visual.runner = None
    return model
