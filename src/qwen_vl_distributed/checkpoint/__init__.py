"""HF safetensors checkpoint directories: index and headers, per-stage strict loading, the key map (expert layouts),
FP8 dequantisation, inspection, synthetic checkpoints. See docs/weight_mapping.md.

    ckpt = open_checkpoint(model_dir)                  # config.json + index; no tensor data
    report = load_stage(stage_module, ckpt, "cuda:0", torch.bfloat16, stage_name="stage 1 (layers 47-93)")
"""

from .errors import (CheckpointError, ConfigMismatchError, CorruptFileError, DtypeError, LayoutError,
                     MissingKeyError, ShapeMismatchError, UnexpectedKeyError)
from .index import Checkpoint, open_checkpoint
from .loader import LoadReport, load_stage

__all__ = [
    "Checkpoint", "open_checkpoint", "LoadReport", "load_stage",
    "CheckpointError", "ConfigMismatchError", "CorruptFileError", "DtypeError", "LayoutError", "MissingKeyError",
    "ShapeMismatchError", "UnexpectedKeyError",
]
