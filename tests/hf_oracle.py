"""The test oracle: HF transformers' Qwen3VLMoeForConditionalGeneration on the same tiny random weights as ours."""

from __future__ import annotations

import torch

from qwen_vl_distributed.model.config import ModelConfig, config_to_dict


def randomize(model: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Non-degenerate weights: HF initialises routers to zero and norms to one, which would hide routing and norm
    bugs. Matrices N(0, std), routers 0.5 N, norms 1 + 0.1 N, biases 0.02 N."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def hf_model(cfg: ModelConfig, seed: int = 0):
    """A random HF model for ``cfg`` (``randomize``)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    hf_cfg = Qwen3VLMoeConfig(**config_to_dict(cfg, spelling="hf"))
    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(hf_cfg).float().eval()
    randomize(model, seed + 1)
    return model
