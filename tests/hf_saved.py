"""Checkpoints written by transformers' own ``save_pretrained`` (model and processor), as anyone who fine-tunes, merges
or re-saves the release with transformers 5 gets them: config.json in transformers' spelling (``num_local_experts``,
``rope_parameters``, a vision ``rope_parameters``), the merged ``processor_config.json``, and the experts fused in
transformers' orientation; or, transposed after saving, in the release's orientation, which transformers reads too.

The shapes are held out from our presets: odd widths, head dims that are not powers of two, GQA ratios other than
the 235B's 16, few experts and a small top-k, tied and untied embeddings, attention biases.
"""

from __future__ import annotations

import os

import torch

from hf_oracle import randomize

SHAPES = {
    # head_dim 8, GQA 2, 12 experts top-3, two DeepStack taps
    "hd8-gqa2": dict(
        text=dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=8, moe_intermediate_size=20,
                  num_local_experts=12, num_experts_per_tok=3, num_hidden_layers=5,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1],
                                   "mrope_interleaved": True}),
        vision=dict(depth=3, hidden_size=24, num_heads=2, intermediate_size=40, num_position_embeddings=36,
                    deepstack_visual_indexes=[0, 2], out_hidden_size=48),
        tie_word_embeddings=False),
    # head_dim 12, GQA 3, 5 experts top-2, one DeepStack tap, tied embeddings, q/k/v/o biases
    "hd12-gqa3-tied-bias": dict(
        text=dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=12, moe_intermediate_size=28,
                  num_local_experts=5, num_experts_per_tok=2, num_hidden_layers=4, attention_bias=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 2, 2],
                                   "mrope_interleaved": True}),
        vision=dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=44, num_position_embeddings=49,
                    deepstack_visual_indexes=[1], out_hidden_size=72),
        tie_word_embeddings=True),
}
# matrices at 0.2 N: at smaller scales the tied shape's greedy output just repeats a token, which would prove little
STD = 0.2
EOS = [151645, 151643]


def _to_release_orientation(directory: str) -> None:
    """Transpose the fused experts of a saved checkpoint into the release's orientation ([E, H, 2I], [E, I, H])."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    for key in [k for k in tensors if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
        tensors[key] = tensors[key].transpose(1, 2).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def save_hf_checkpoint(directory: str, shape: str, orientation: str, seed: int = 0) -> str:
    """Write a random model of ``SHAPES[shape]`` with transformers' save_pretrained, and the processor files with
    the processor's save_pretrained."""
    from transformers import AutoProcessor, GenerationConfig, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    from qwen_vl_distributed.checkpoint.synth_processor import write_processor_files

    spec = SHAPES[shape]
    cfg = Qwen3VLMoeConfig(text_config=dict(spec["text"]), vision_config=dict(spec["vision"]),
                           tie_word_embeddings=spec["tie_word_embeddings"], dtype="float32")
    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(cfg).float().eval()
    randomize(model, seed + 1, STD)
    model.generation_config = GenerationConfig(bos_token_id=151643, eos_token_id=EOS, pad_token_id=151643)
    model.save_pretrained(directory)
    source = directory + ".processor-source"
    write_processor_files(source)
    AutoProcessor.from_pretrained(source).save_pretrained(directory)
    if orientation == "released":
        _to_release_orientation(directory)
    return directory


def hf_saved_dir(tmp_path_factory, shape: str, orientation: str) -> str:
    """One checkpoint per (shape, orientation) per pytest run."""
    d = tmp_path_factory.getbasetemp() / f"hf-saved-{shape}-{orientation}"
    if not (d / "processor_config.json").exists():
        save_hf_checkpoint(str(d), shape, orientation)
    return str(d)
