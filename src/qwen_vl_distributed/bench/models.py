"""Models for ``qwen-vl bench``: HF transformers' model and ours on the SAME random weights, built on the GPU.

HF is built first (real dimensions, bf16, on the device) and randomised in place; ours is built on the meta device
and takes HF's tensors with ``load_state_dict(assign=True)`` -- one copy of the weights, two models. Stage views
(a layers-only middle stage) share the same storage the same way.

Bytes and FLOPs of one decoder layer are counted here from the config (B batch, T tokens, ctx cached tokens).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..model.config import ModelConfig, config_to_dict
from ..model.kv_cache import KVCache
from ..model.qwen3_vl import Qwen3VLMoe


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def randomize_(model: torch.nn.Module, seed: int, hidden: int) -> None:
    """Random weights with random routers (HF initialises routers to zero: every token would pick the same
    experts) and norms near one; small matrices so activations stay in range."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, hidden**-0.5, generator=g)  # router logits ~ N(0, 1): spread-out routing
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=g)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)


def build_hf(cfg: ModelConfig, device, experts: str = "grouped_mm"):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    bf16 = dataclasses.replace(cfg, torch_dtype="bfloat16")  # HF builds in the config's dtype
    hf_cfg = Qwen3VLMoeConfig(**config_to_dict(bf16, spelling="hf"), attn_implementation="sdpa",
                              experts_implementation=experts)
    with default_dtype(torch.bfloat16), torch.device(device):
        model = Qwen3VLMoeForConditionalGeneration(hf_cfg)
    model.to(torch.bfloat16).eval()
    set_hf_experts(model, experts)
    return model


def set_hf_experts(hf, experts: str) -> None:
    hf.set_experts_implementation(experts)


def ours_from(cfg: ModelConfig, state: dict[str, torch.Tensor], **stage) -> Qwen3VLMoe:
    """Our model (or a stage of it: layers=(a, b), vision=, embed=, head=) sharing ``state``'s storage."""
    with torch.device("meta"):
        model = Qwen3VLMoe(cfg, **stage)
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True, assign=True)
    return model.eval()


def build_pair(cfg: ModelConfig, device, seed: int = 0):
    """(hf, ours): HF with grouped_mm experts and ours (whole model), one copy of random bf16 weights."""
    hf = build_hf(cfg, device)
    randomize_(hf, seed, cfg.text.hidden_size)
    ours = ours_from(cfg, hf.state_dict())
    return hf, ours


# ------------------------------------------------------------------------------------------------------------------
# Accounting (per decoder layer, bf16 = 2 bytes)


def attention_params(cfg: ModelConfig) -> int:
    t = cfg.text
    return t.hidden_size * (2 * t.q_dim + 2 * t.kv_dim)  # q, k, v, o projections


def expert_params(cfg: ModelConfig) -> int:
    t = cfg.text
    return 3 * t.hidden_size * t.moe_intermediate_size


def decode_layer_bytes(cfg: ModelConfig, unique_experts: float, batch: int, ctx: int,
                       expert_bytes: float = 2.0) -> float:
    """Fewest bytes one decode step must read per layer: attention weights, router, norms, the experts hit (at
    ``expert_bytes`` per weight: 2 in bf16, 1 + the block scales' share in fp8), and the sequences' cached k/v
    (plus writing the new k/v)."""
    t = cfg.text
    weights = attention_params(cfg) + t.num_experts * t.hidden_size + 2 * t.hidden_size + 2 * t.head_dim
    kv = batch * (ctx + 1) * 2 * t.num_key_value_heads * t.head_dim
    return 2.0 * (weights + kv) + expert_bytes * unique_experts * expert_params(cfg)


def prefill_layer_flops(cfg: ModelConfig, tokens: int) -> float:
    """Matmul FLOPs of one layer over a causal prompt of ``tokens``: projections, router, K experts per token,
    and the attention scores/values (causal: half of the T x T square)."""
    t = cfg.text
    dense = attention_params(cfg) + t.num_experts * t.hidden_size + t.num_experts_per_tok * expert_params(cfg)
    attn = 2 * t.num_attention_heads * t.head_dim * tokens * tokens  # 2 matmuls x 2 flops x T^2 / 2
    return 2.0 * dense * tokens + attn


def prefill_layer_floor(cfg: ModelConfig, tokens: int, copy_gbs: float, matmul_tflops: float) -> dict:
    """The least time one layer of a ``tokens`` prompt can take on a GPU of this copy bandwidth and bf16 matmul
    peak, and the MFU that time would be: the experts' part (the weights of every expert the prompt hits, expected
    under uniform routing, read once; or their K-per-token FLOPs at the peak, whichever is longer) plus the rest
    (attention weights and router read once, or the projections' and attention's FLOPs at the peak). The two run one
    after the other inside a layer, so they add. A measured MFU reads against ``mfu_at_floor``, not 100%."""
    t = cfg.text
    e, k = t.num_experts, t.num_experts_per_tok
    hit = e * (1.0 - (1.0 - k / e) ** tokens)
    bw, peak = copy_gbs * 1e9, matmul_tflops * 1e12
    expert_flops = 2.0 * tokens * k * expert_params(cfg)
    experts_s = max(2.0 * hit * expert_params(cfg) / bw, expert_flops / peak)
    total = prefill_layer_flops(cfg, tokens)
    rest_s = max(2.0 * (attention_params(cfg) + e * t.hidden_size) / bw, (total - expert_flops) / peak)
    floor_s = experts_s + rest_s
    return {"floor_ms": 1e3 * floor_s, "experts_ms": 1e3 * experts_s, "rest_ms": 1e3 * rest_s,
            "experts_bound": "memory" if experts_s > expert_flops / peak else "compute",
            "mfu_at_floor": total / floor_s / peak}


def vision_flops(cfg: ModelConfig, patches: int) -> float:
    v = cfg.vision
    per_block = 2 * patches * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    attn = 4 * patches * patches * v.hidden_size
    return v.depth * (per_block + attn)


def kv_cache(model: Qwen3VLMoe, seqs: int, length: int, block_size: int | None, seed: int = 0,
             fill: bool = True) -> tuple[KVCache, list[list[int]]]:
    """A KV cache for ``model``'s layers with room for ``seqs`` sequences of ``length`` tokens, and their block
    tables. ``block_size`` tokens per block, handed out in a shuffled order (as a pool that has served for a while
    leaves them); None: one block per sequence (the contiguous layout paged decode is timed against). ``fill``:
    random keys and values, so attention reads real-looking numbers, never zeros."""
    bs = block_size or length
    per = -(-length // bs)
    cache = model.new_cache(seqs * per, bs, length)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(seqs * per, generator=g).tolist() if block_size else list(range(seqs * per))
    if fill:  # (seeded on the device: two caches made alike hold the same numbers)
        gd = torch.Generator(device=cache.k[model.layer_ids[0]].device).manual_seed(seed)
        for i in model.layer_ids:
            cache.k[i].normal_(generator=gd)
            cache.v[i].normal_(generator=gd)
    return cache, [order[i * per:(i + 1) * per] for i in range(seqs)]


def random_vision_tower(cfg: ModelConfig, device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """The vision tower alone with random weights and the 'fast' attention core that ``enable_fast_paths``
    selects (for the vision scripts and GPU tests, which need no decoder layers)."""
    from ..checkpoint.synth_weights import randomize_module
    from ..kernels import register
    from ..model.vision import VisionAttention, VisionTower

    register()
    with torch.device("meta"):
        tower = VisionTower(cfg.vision)
    randomize_module(tower, seed, torch.device(device), dtype)
    for m in tower.modules():
        if isinstance(m, VisionAttention):
            m.impl = "fast"
    return tower.eval()
