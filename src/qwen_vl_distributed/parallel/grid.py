"""The process grid: S pipeline stages x N tensor ranks, one process (and GPU) each.

Ranks are stage-major: stage s holds ranks s*N .. s*N + N-1, so the N ranks of a stage are neighbours (one machine's
GPUs under torchrun, NVLink between them) and rank s*N, the stage's leader, speaks the pipeline protocol. With N = 1
the grid is the pipeline of S processes, rank = stage.

Which heads and experts a tensor rank holds (``heads_of``, ``MoE modes``) is decided here from the config alone, so
every rank, the planner and the loader agree:
- attention: the query heads split evenly; the kv heads split evenly when N divides them, or (N a multiple of the kv
  heads, e.g. 8 ranks over the 235B's 4) each kv head is replicated on the N / KVH ranks whose query heads use it;
- MoE, ``ep`` (expert parallel): rank r holds experts [r*E/N, (r+1)*E/N) whole; ``tp`` (tensor parallel): every rank
  holds every expert, a 1/N slice of its width (gate and up rows, down columns). Either way the block's output is
  a partial sum completed by one all-reduce. ``auto`` picks ``tp`` where the width splits (into whole fp8 blocks for
  an fp8 checkpoint), else ``ep``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..model.config import ModelConfig

MOE_MODES = ("auto", "ep", "tp")


class GridError(UserError, ValueError):
    """A grid that the model's shapes (or the launcher) do not allow; the message names the option and the shape."""


@dataclass(frozen=True)
class Grid:
    stages: int
    tp: int = 1
    moe: str = "tp"  # resolved: "ep" or "tp" (irrelevant with tp = 1)

    def __post_init__(self):
        if self.stages < 1 or self.tp < 1:
            raise GridError(f"a grid of {self.stages} stages x {self.tp} tensor ranks: both must be at least 1")
        if self.moe not in ("ep", "tp"):
            raise GridError(f"MoE parallel mode {self.moe!r}: choose ep or tp")

    @property
    def world(self) -> int:
        return self.stages * self.tp

    def rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """(stage, tensor rank) of a global rank."""
        return divmod(rank, self.tp)

    def stage_ranks(self, stage: int) -> list[int]:
        return [self.rank(stage, t) for t in range(self.tp)]

    @property
    def leaders(self) -> list[int]:
        """The rank of each stage that speaks the pipeline protocol (its tensor rank 0), in stage order."""
        return [self.rank(s, 0) for s in range(self.stages)]

    def label(self, rank: int) -> str:
        """How messages name a rank: 'stage 1', or 'stage 1 tensor rank 2' with several per stage."""
        stage, tp_rank = self.coords(rank)
        return f"stage {stage}" + (f" tensor rank {tp_rank}" if self.tp > 1 else "")

    def key(self) -> str:
        """What every rank must agree on (part of the start-up fingerprint)."""
        return f"{self.stages}x{self.tp}" + (f"/{self.moe}" if self.tp > 1 else "")


def heads_of(cfg: ModelConfig, tp: int, tp_rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(query heads [a, b), kv heads [a, b)) that tensor rank ``tp_rank`` of ``tp`` holds."""
    t = cfg.text
    nh = t.num_attention_heads // tp
    q = (tp_rank * nh, (tp_rank + 1) * nh)
    if t.num_key_value_heads >= tp:
        kvh = t.num_key_value_heads // tp
        return q, (tp_rank * kvh, (tp_rank + 1) * kvh)
    g = tp_rank // (tp // t.num_key_value_heads)  # this rank's query heads all use kv head g
    return q, (g, g + 1)


def experts_of(cfg: ModelConfig, tp: int, tp_rank: int) -> tuple[int, int]:
    """The experts [first, stop) an expert-parallel rank holds."""
    n = cfg.text.num_experts // tp
    return tp_rank * n, (tp_rank + 1) * n


def resolve_moe(cfg: ModelConfig, tp: int, mode: str, fp8_block: tuple[int, int] | None = None) -> str:
    """``ep`` or ``tp`` for ``--moe-parallel mode`` (``auto``: tp where the experts' width splits into whole fp8
    blocks, else ep)."""
    if mode not in MOE_MODES:
        raise GridError(f"--moe-parallel {mode!r}: choose one of {', '.join(MOE_MODES)}")
    if mode != "auto":
        return mode
    inter = cfg.text.moe_intermediate_size
    width_splits = inter % tp == 0 and (fp8_block is None or (inter // tp) % fp8_block[0] == 0)
    return "tp" if width_splits or cfg.text.num_experts % tp else "ep"


def make_grid(cfg: ModelConfig, stages: int, tp: int, moe: str = "auto") -> Grid:
    """The grid for ``--stages``, ``--tensor-parallel-size`` and ``--moe-parallel``, checked against the model.
    Slices of an fp8 checkpoint's experts must hold whole blocks whether they stay fp8 or are dequantised."""
    q = cfg.quantization
    block = tuple(q.weight_block_size) if q is not None and q.quant_method == "fp8" else None
    grid = Grid(stages, tp, resolve_moe(cfg, tp, moe, block))
    check_grid(cfg, grid)
    return grid


def check_grid(cfg: ModelConfig, grid: Grid) -> None:
    """Refuse, naming the option and the shape, a grid whose tensor ranks cannot split this model evenly."""
    t, n = cfg.text, grid.tp
    if n == 1:
        return
    flag = f"--tensor-parallel-size {n}"
    if t.num_attention_heads % n:
        raise GridError(f"{flag}: the model's {t.num_attention_heads} attention heads do not split into {n} equal "
                        f"parts (text_config.num_attention_heads)")
    kvh = t.num_key_value_heads
    if kvh % n and n % kvh:
        raise GridError(f"{flag}: the model's {kvh} kv heads neither split into {n} equal parts nor replicate "
                        f"evenly over {n} ranks (text_config.num_key_value_heads)")
    if t.attention_bias:
        raise GridError(f"{flag}: attention projections with biases (text_config.attention_bias) are not split "
                        f"across tensor ranks")
    if grid.moe == "ep" and t.num_experts % n:
        raise GridError(f"{flag} with --moe-parallel ep: the model's {t.num_experts} experts do not split into {n} "
                        f"equal parts (text_config.num_experts)")
    if grid.moe == "tp" and t.moe_intermediate_size % n:
        raise GridError(f"{flag} with --moe-parallel tp: the experts' width {t.moe_intermediate_size} does not "
                        f"split into {n} equal parts (text_config.moe_intermediate_size)")
