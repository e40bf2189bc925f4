"""The test oracle: HF transformers' Qwen3VLMoeForConditionalGeneration on the same tiny random weights as ours."""

from __future__ import annotations

import torch

from qwen_vl_distributed.model.config import ModelConfig, config_to_dict


def hf_model(cfg: ModelConfig, seed: int = 0):
    """A random HF model for ``cfg`` with non-degenerate routers and norms (HF initialises routers to zero and norms
    to one, which would hide routing and norm bugs)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    hf_cfg = Qwen3VLMoeConfig(**config_to_dict(cfg, spelling="hf5"))
    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(hf_cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model
