"""Checkpoint errors: each is one line naming the file and the tensor at fault.

All derive from UserError, so the CLI prints them as ``error: ...`` without a traceback. Subclasses let callers and
tests tell the cases apart without parsing messages.
"""

from __future__ import annotations

from ..errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint directory or file that cannot be loaded as asked."""


class CorruptFileError(CheckpointError):
    """A safetensors file or index that is truncated, not JSON, or points outside its file."""


class MissingKeyError(CheckpointError):
    """A parameter of the stage has no tensor in the checkpoint."""


class UnexpectedKeyError(CheckpointError):
    """A checkpoint tensor that belongs to the stage but no parameter consumes."""


class ShapeMismatchError(CheckpointError):
    """A tensor whose stored shape is not the one the parameter needs."""


class DtypeError(CheckpointError):
    """A tensor whose dtype cannot become a floating-point parameter (integers, fp8 without its scale)."""


class ConfigMismatchError(CheckpointError):
    """config.json describes a model of different dimensions than the tensors do."""


class LayoutError(CheckpointError):
    """Expert tensors whose orientation cannot be decided, or that mix fused and per-expert storage."""
