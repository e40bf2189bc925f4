"""Assemble a running system from a model directory: grid, plan, processes, weights, engine.

One code path for every grid of S stages x N tensor ranks: ``start_engine`` builds rank 0's part here (S = N = 1:
the whole model, local executor); for more ranks it starts (or, under torchrun, joins) the other processes, which
run ``run_worker`` with the same options. Every rank builds only its own modules and loads only its own tensors
(with N > 1, only its slice of each sharded tensor: parallel.shard).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from ..checkpoint.index import open_checkpoint
from ..checkpoint.loader import load_stage
from ..errors import UserError
from ..model.config import ModelConfig, QuantizationConfig
from ..model.qwen3_vl import Qwen3VLMoe
from ..pipeline import distributed as pd
from ..parallel.grid import Grid, make_grid
from ..parallel.group import StageGroup, stage_groups
from ..parallel.shard import attach_reduce, shard_stage
from ..pipeline.executor import LocalExecutor, PipelineExecutor
from ..pipeline.launch import Placement, Supervisor, torchrun_placement, under_torchrun
from ..pipeline.plan import DEFAULT_KV_BLOCK_SIZE, StagePlan, plan_stages
from ..pipeline.stage import StageRuntime
from ..pipeline.transport import Transport
from ..pipeline.worker import follow_stage, serve_stage
from .engine import Engine
from .grammar import GrammarBackend
from .sampler import SequenceSampler
from .threads import set_stage_threads

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunOptions:
    model: str  # a local checkpoint directory (cli.options resolves hub ids and cache folders to one)
    revision: str | None = None  # the hub commit ``model`` is a snapshot of; None for a plain directory
    stages: int = 1
    tensor_parallel: int = 1  # tensor ranks per stage (processes, GPUs)
    moe_parallel: str = "auto"  # how a stage's tensor ranks split the experts: ep, tp or auto (parallel.grid)
    device: str = "cpu"
    dtype: str = "float32"
    max_batch: int = 8  # the most sequences running at once (not a memory reservation)
    max_len: int = 4096  # tokens per sequence (prompt + output)
    # tokens of KV cache (all sequences together) in every stage's block pool; None: on CUDA what the plan leaves
    # free on the tightest GPU, on CPU max_len x max_batch
    max_total_tokens: int | None = None
    kv_block_size: int = DEFAULT_KV_BLOCK_SIZE  # tokens per KV block
    prefix_cache: bool = True  # reuse the KV blocks of earlier requests' identical prefixes
    # submit a decode step before reading the previous one's tokens (one stage of one rank): True, False, or None:
    # on where it can be, with one stage of one rank on CUDA (on the CPU the step waits for itself: nothing to gain)
    run_ahead: bool | None = None
    prefill_chunk: int | None = None  # tokens per step; None: plan.default_prefill_chunk(max_len, max_batch)
    layers_per_stage: list[int] | None = None
    gpu_mem_gb: list[float] | None = None  # per-stage budgets; default on CUDA: this machine's GPU memory
    stage_timeout_s: float = 60.0  # a stage silent for this long is declared hung
    startup_timeout_s: float = 1800.0  # loading a 235B stage can take minutes
    quiet: bool = False
    # an fp8 checkpoint's experts: "keep" them fp8 in memory (half the bytes), "dequantize" them at load time,
    # "auto": keep them where the fp8 kernels run (CUDA GPUs of compute capability 8.9 and up), or "w8a8": keep
    # them and quantise their inputs too (model.quant.w8a8_linear)
    fp8_experts: str = "auto"
    # the vision tower's block linears in fp8 (model.quant.Fp8Linear): faster images for fp8 rounding of the tower's
    # activations (docs/parity.md gives the error); GPUs of compute capability 8.9+ in bf16, or the CPU's reference
    vision_fp8: bool = False
    # Benchmarks only: no checkpoint; a preset with this many layers and random weights made on each stage's device.
    random_preset: str | None = None
    random_layers: int | None = None
    random_fp8: bool = False  # and its experts quantised to fp8 (128x128 blocks) and kept so, as an fp8 release

    def to_json(self) -> str:
        """The one serialized form that carries these options to the other stage processes."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunOptions":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:  # a driver from another version of the code
            raise UserError(f"worker options: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def grid(self, cfg: ModelConfig) -> Grid:
        """The process grid every rank computes alike: stages x tensor ranks and how those split the experts."""
        return make_grid(cfg, self.stages, self.tensor_parallel, self.moe_parallel)

    def worker_argv(self, rank: int, world: int, init_method: str) -> list[str]:
        return ["worker", "--options", self.to_json(), "--rank", str(rank), "--world-size", str(world),
                "--init-method", init_method]


@dataclass
class EngineHandle:
    engine: Engine
    cfg: ModelConfig
    plan: StagePlan
    eos_ids: list[int]
    grid: Grid
    close: callable = field(repr=False, default=lambda: None)  # orderly: 'stop' round the ring, wait for workers
    abort: callable = field(repr=False, default=lambda: None)  # after a failure: kill the workers of this machine


@dataclass
class RandomWeights:
    """Stands in for a checkpoint in benchmarks: a config and a seed, nothing on disk."""

    cfg: ModelConfig
    seed: int = 0


def open_source(opts: RunOptions):
    """The checkpoint directory, or (benchmarks) a random-weight stand-in for a preset with ``random_layers``."""
    if opts.random_preset:
        from ..model.config import preset

        cfg = preset(opts.random_preset)
        layers = opts.random_layers or cfg.text.num_hidden_layers
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=layers),
                                  quantization=QuantizationConfig() if opts.random_fp8 else None)
        return RandomWeights(cfg)
    return open_checkpoint(opts.model)


def read_generation_config(model_dir: str, required: bool = False) -> dict:
    """generation_config.json as a dict. ``required``: a missing or unreadable file is a UserError; otherwise it
    gives {} (request defaults are optional, stop tokens are not)."""
    path = os.path.join(model_dir, "generation_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        if required:
            raise UserError(f"{path}: missing (needed for the stop tokens)") from None
        return {}
    except (OSError, json.JSONDecodeError) as e:
        if required:
            what = "not valid JSON" if isinstance(e, json.JSONDecodeError) else "unreadable"
            raise UserError(f"{path}: {what} ({e})") from None
        return {}
    return data if isinstance(data, dict) else {}


def read_eos_ids(model_dir: str) -> list[int]:
    """Stop tokens from generation_config.json (int or list); none there is an error, not a silent never-stop."""
    eos = read_generation_config(model_dir, required=True).get("eos_token_id")
    if eos is None:
        raise UserError(f"{os.path.join(model_dir, 'generation_config.json')}: no eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos)


FP8_EXPERTS_MODES = ("auto", "keep", "w8a8", "dequantize")


def fp8_kernels_run_here(device: str) -> bool:
    """Whether every GPU of this machine runs the fp8 expert kernels (kernels.fp8_runs_on). On CPU and older GPUs
    the experts' reference would dequantise each expert on every use."""
    from ..kernels import fp8_runs_on  # imports no Triton

    if device != "cuda" or not torch.cuda.is_available():
        return False
    return all(fp8_runs_on(torch.device("cuda", i)) for i in range(torch.cuda.device_count()))


def fp8_block(cfg: ModelConfig, opts: RunOptions) -> tuple[int, int] | None:
    """The block of the fp8 experts this run keeps in memory, or None (not an fp8 checkpoint, or dequantised)."""
    if opts.fp8_experts not in FP8_EXPERTS_MODES:
        raise UserError(f"--fp8-experts {opts.fp8_experts!r}: choose one of {', '.join(FP8_EXPERTS_MODES)}")
    q = cfg.quantization
    if q is None or q.quant_method != "fp8" or opts.fp8_experts == "dequantize":
        return None
    if opts.fp8_experts == "auto" and not fp8_kernels_run_here(opts.device):
        return None
    return tuple(q.weight_block_size)


def check_vision_fp8(opts: RunOptions) -> None:
    """--vision-fp8 where it cannot run fast is refused: it needs fp8 tensor cores (compute capability 8.9+) on every
    GPU of this machine and bf16 / fp16 activations there (the fp8 GEMMs' output types)."""
    if not opts.vision_fp8 or opts.device != "cuda":
        return
    if opts.dtype == "float32":
        raise UserError("--vision-fp8 on cuda runs with --dtype bfloat16 (the fp8 GEMMs write bf16), not float32")
    if torch.cuda.is_available() and not fp8_kernels_run_here(opts.device):
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        raise UserError(f"--vision-fp8 needs GPUs with fp8 tensor cores (compute capability 8.9+); this machine's "
                        f"are {', '.join(f'{a}.{b}' for a, b in caps)}")


def make_plan(cfg: ModelConfig, opts: RunOptions, grid: Grid | None = None, require_fit: bool = True) -> StagePlan:
    """The stage plan every rank computes alike (and ``qwen-vl plan`` shows), for ``grid`` (default: the options').
    On CUDA it must fit the GPUs (``--gpu-mem``, else the memory of this machine's smallest GPU, divided among the
    ranks that share one where there are more ranks than GPUs): a plan that cannot fit is refused before any weight
    is read, unless ``require_fit`` is off (the plan then says which stage does not
    fit)."""
    grid = grid or opts.grid(cfg)
    check_vision_fp8(opts)
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16"}[opts.dtype]
    if dtype == "bf16" and fp8_block(cfg, opts) is not None:
        dtype = "fp8"  # the experts at one byte (plus scales), the rest in bf16
    budget = opts.gpu_mem_gb
    if budget is None and opts.device == "cuda" and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        # ranks of this machine that share a GPU (more of them than GPUs: pipeline.distributed.stage_device) share
        # its memory too
        local = torchrun_placement().local_world if under_torchrun() else grid.world
        budget = [min(torch.cuda.get_device_properties(i).total_memory for i in range(gpus)) / 1e9
                  / -(-local // gpus)]
    if budget is not None and len(budget) == 1:
        budget = budget[0]
    return plan_stages(cfg, opts.stages, layers_per_stage=opts.layers_per_stage, gpu_mem_gb=budget,
                       max_seq_len=opts.max_len, max_batch=opts.max_batch, dtype=dtype,
                       prefill_chunk=opts.prefill_chunk, max_total_tokens=opts.max_total_tokens,
                       kv_block_size=opts.kv_block_size, require_fit=require_fit and budget is not None, tp=grid.tp,
                       moe=grid.moe)


def checkpoint_digest(ckpt) -> str:
    """A cheap digest of the weights: config.json, the index, and per shard its size, header and a 64 KiB sample
    of its data (so two copies with different weights differ too). A random-weight stand-in: its config and seed."""
    h = hashlib.sha256()
    if isinstance(ckpt, RandomWeights):
        h.update(repr((ckpt.cfg, ckpt.seed)).encode())
        return h.hexdigest()[:16]
    for name in ("config.json", "model.safetensors.index.json"):
        path = os.path.join(ckpt.dir, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                h.update(f.read())
    for file in ckpt.files():
        path = ckpt.path(file)
        h.update(f"{file}:{os.path.getsize(path)}".encode())
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, 1 << 24)))  # header
            h.update(f.read(1 << 16))  # the first bytes of tensor data
    return h.hexdigest()[:16]


def source_digest(root: str) -> str:
    """sha256 of the Python source files under ``root`` (each one's path below it, then its bytes, in path order)."""
    h = hashlib.sha256()
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """This package's source digest: two machines running different code refuse to start together, whatever their
    version strings say."""
    return source_digest(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fingerprint(ckpt, plan: StagePlan, grid: Grid, opts: RunOptions) -> dict[str, str]:
    """What all ranks must agree on before the first step. Each machine is expected to hold the whole checkpoint
    directory (or the same hub revision in its cache)."""
    from .. import __version__

    return {"checkpoint": checkpoint_digest(ckpt), "revision": opts.revision or "-", "plan": plan.fingerprint(),
            "grid": grid.key(), "dtype": opts.dtype, "fp8_experts": opts.fp8_experts,
            "vision_fp8": str(opts.vision_fp8),
            "kv_blocks": f"{plan.kv_blocks}x{plan.kv_block_size}", "max_len": str(opts.max_len),
            "max_batch": str(opts.max_batch), "version": __version__, "code": code_digest()}


def load_rank(ckpt, plan: StagePlan, grid: Grid, rank: int, device: torch.device, opts: RunOptions) -> Qwen3VLMoe:
    """This rank's part of its stage: its modules built on the meta device and cut to its tensor rank's share,
    exactly its tensors (or their slices) loaded."""
    stage, tp_rank = grid.coords(rank)
    st = plan.stages[stage]
    with torch.device("meta"):
        model = Qwen3VLMoe(ckpt.cfg, layers=(st.start, st.stop), vision=st.holds_vision, embed=st.holds_embed,
                           head=st.holds_head)
    shards = shard_stage(model, grid, tp_rank)
    name = f"{grid.label(rank)} (layers {st.start}-{st.stop - 1})"
    block = fp8_block(ckpt.cfg, opts)
    if isinstance(ckpt, RandomWeights):
        from ..checkpoint.synth_weights import randomize_module

        randomize_module(model, ckpt.seed, device, TORCH_DTYPES[opts.dtype])
        if block is not None:
            model.keep_experts_fp8(block, quantize=True, act_quant=opts.fp8_experts == "w8a8")
    else:
        if block is not None:  # the loader copies the stored fp8 experts and their scales as they are
            model.keep_experts_fp8(block, act_quant=opts.fp8_experts == "w8a8")
        load_stage(model, ckpt, device, TORCH_DTYPES[opts.dtype], stage_name=name, progress=not opts.quiet,
                   progress_line=rank, shards=shards)
    if opts.vision_fp8 and model.has_vision:
        model.model.visual.quantize_linears_fp8()
    return model.eval()


def prepare_runtime(ckpt, model: Qwen3VLMoe, plan: StagePlan, stage: int, device: torch.device, opts: RunOptions,
                    group: StageGroup | None = None) -> StageRuntime:
    """A loaded stage made ready to run: its sharded blocks completed by the group's all-reduce, its KV pool
    (``plan.kv_blocks`` blocks, as on every stage, plus the scratch block; of the kv heads this rank holds), the
    last stage's sampler (on its leader alone: the other tensor ranks' logits are dropped), and on a GPU its fast
    paths, decode graphs and compiled prompt kernels (every tensor rank of the stage runs the same warm-up, meeting
    in the same all-reduces)."""
    if group is not None:
        attach_reduce(model, group.all_reduce)
    dtype = TORCH_DTYPES[opts.dtype]
    leads = group is None or group.is_leader
    sampler = SequenceSampler(_grammars(ckpt)) if model.has_head and leads else None
    name = f"stage {stage}"
    cache = model.new_cache(plan.kv_blocks, plan.kv_block_size, opts.max_len, dtype, device)
    if device.type != "cuda":
        return StageRuntime(model, cache, sampler, device, stage, group)
    from ..kernels import enable_fast_paths
    from ..runtime.cuda_graph import DEFAULT_BUCKETS, GraphedStage
    from ..runtime.warmup import warm_stage

    enable_fast_paths(model)
    stage_model = model
    if group is None or group.device.type == "cuda":  # (collectives through the host, gloo, cannot be captured)
        top = next(b for b in DEFAULT_BUCKETS + (opts.max_batch,) if b >= opts.max_batch)
        stage_model = GraphedStage(model, cache, buckets=tuple(b for b in DEFAULT_BUCKETS if b < top) + (top,))
    # the prompt path's kernels compile now, not in the first requests (runtime.warmup)
    warm_stage(stage_model, cache, plan.prefill_chunk, name, quiet=opts.quiet)
    return StageRuntime(stage_model, cache, sampler, device, stage, group)


def build_runtime(ckpt, plan: StagePlan, rank: int, device: torch.device, opts: RunOptions) -> StageRuntime:
    """Rank ``rank``'s stage, loaded and made ready, in this process alone (no tensor group: one rank per stage)."""
    grid = opts.grid(ckpt.cfg)
    if grid.tp > 1:
        raise ValueError("build_runtime builds a stage of one rank; a grid of tensor ranks starts with start_engine")
    model = load_rank(ckpt, plan, grid, rank, device, opts)
    return prepare_runtime(ckpt, model, plan, grid.coords(rank)[0], device, opts)


def _grammars(ckpt) -> GrammarBackend | None:
    """Structured output on the last stage: the checkpoint's tokenizer and stop tokens (none for random weights,
    which have no tokenizer)."""
    if isinstance(ckpt, RandomWeights):
        return None
    return GrammarBackend(ckpt.dir, ckpt.cfg.text.vocab_size, read_eos_ids(ckpt.dir))


def new_engine(cfg: ModelConfig, executor, plan: StagePlan, opts: RunOptions, eos: list[int]) -> Engine:
    """The driver over ``executor``, with the plan's KV pool."""
    run_ahead = opts.run_ahead
    if run_ahead is None:
        run_ahead = opts.device == "cuda" and getattr(executor, "can_run_ahead", False)
    return Engine(cfg, executor, opts.max_batch, opts.max_len, eos, num_blocks=plan.kv_blocks,
                  block_size=plan.kv_block_size, prefix_cache=opts.prefix_cache, max_step_tokens=plan.prefill_chunk,
                  run_ahead=run_ahead)


def start_engine(opts: RunOptions) -> EngineHandle:
    if opts.dtype not in TORCH_DTYPES:
        raise UserError(f"--dtype {opts.dtype!r}: choose float32 or bfloat16")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    ckpt = open_source(opts)
    eos = [] if isinstance(ckpt, RandomWeights) else read_eos_ids(opts.model)  # random weights: never stop early
    grid = opts.grid(ckpt.cfg)
    if opts.run_ahead is True and grid.world != 1:  # (before any process starts)
        raise UserError(f"--run-ahead: needs one stage of one rank (the grid has {grid.stages} stage(s) of "
                        f"{grid.tp} rank(s))")
    plan = make_plan(ckpt.cfg, opts, grid)
    if grid.world == 1:
        if under_torchrun() and torchrun_placement().world != 1:
            raise UserError(f"--stages 1 but torchrun started {torchrun_placement().world} processes "
                            "(one per stage and tensor rank)")
        runtime = build_runtime(ckpt, plan, 0, pd.stage_device(opts.device, 0), opts)
        return EngineHandle(new_engine(ckpt.cfg, LocalExecutor(runtime), plan, opts, eos), ckpt.cfg, plan, eos, grid)
    return _start_grid(opts, ckpt, plan, grid, eos)


def _start_grid(opts: RunOptions, ckpt, plan: StagePlan, grid: Grid, eos: list[int]) -> EngineHandle:
    supervisor = listener = None
    if under_torchrun():
        where = _checked_world(grid, torchrun_placement())
    else:  # every rank on this machine: the rendezvous and the ranks' connections on loopback only
        pd.pin_to_loopback()
        listener = pd.loopback_listener()
        where = Placement(0, grid.world, 0, grid.world, f"tcp://127.0.0.1:{listener.getsockname()[1]}")
        supervisor = Supervisor(lambda r: opts.worker_argv(r, where.world, where.init_method), where.world,
                                name_of=lambda r: f"{grid.label(r)} (rank {r}")
    try:
        runtime, transport, ctx = _join(opts, ckpt, plan, grid, where, listener)
    except BaseException:
        if supervisor:
            supervisor.kill_all()
        raise
    if grid.stages == 1:  # one stage of tensor ranks: no ring, heartbeats to the other ranks only
        executor = LocalExecutor(runtime, heartbeat_s=opts.stage_timeout_s / 4)
    else:
        executor = PipelineExecutor(runtime, transport, heartbeat_s=opts.stage_timeout_s / 4)
    engine = new_engine(ckpt.cfg, executor, plan, opts, eos)

    def close():
        try:
            executor.shutdown()
        finally:
            if supervisor:
                supervisor.stop()
            pd.shutdown()

    def abort():
        """After a failure the other workers stop on their own within moments (their peers are gone), printing
        what they saw; give them that moment, then kill whatever is left."""
        if supervisor:
            supervisor.await_failure(1.0)  # a dead worker is named by the watcher, not only by its effects here
            supervisor.stop(timeout_s=3.0)
        pd.shutdown()

    return EngineHandle(engine, ckpt.cfg, plan, eos, grid, close, abort)


def _checked_world(grid: Grid, where: Placement) -> Placement:
    if where.world != grid.world:
        raise UserError(f"--stages {grid.stages} x --tensor-parallel-size {grid.tp} needs {grid.world} processes, "
                        f"but torchrun started {where.world}")
    return where


def _error_line(e: Exception) -> str:
    return str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _join(opts: RunOptions, ckpt, plan: StagePlan, grid: Grid, where: Placement, listener=None):
    """Common to every rank: process group, agreement, the stage's tensor group, load own part, ready check,
    warm-up (its collectives need every rank of the stage loaded), second ready check, transport. ``listener``:
    rank 0's socket for the rendezvous store, when it serves one (pipeline.distributed.loopback_listener)."""
    backend = pd.choose_backend(opts.device, where.local_world)
    device = pd.stage_device(opts.device, where.local_rank)
    set_stage_threads(device, where.local_world, os.cpu_count() or 1)  # engine/threads.py
    ctx = pd.init_distributed(where.rank, where.world, where.init_method, backend, device,
                              connect_timeout_s=opts.stage_timeout_s + 120, startup_timeout_s=opts.startup_timeout_s,
                              listener=listener, grid=grid)
    try:
        pd.agree(ctx, {**fingerprint(ckpt, plan, grid, opts), "backend": backend})
        group = stage_groups(grid, where.rank, backend, device, opts.stage_timeout_s)
        model, runtime, error = None, None, None
        try:
            model = load_rank(ckpt, plan, grid, where.rank, device, opts)
        except Exception as e:  # out of memory, a bad tensor, ...: every rank must hear of it, not hang
            error = _error_line(e)
        pd.report_ready(ctx, error)
        try:
            runtime = prepare_runtime(ckpt, model, plan, ctx.stage, device, opts, group)
        except Exception as e:
            error = _error_line(e)
        pd.report_ready(ctx, error)
        transport = None
        if where.rank in grid.leaders:
            transport = Transport(where.rank, grid.leaders, backend, device, opts.stage_timeout_s, ctx.peers,
                                  TORCH_DTYPES[opts.dtype], ctx.control)
    except BaseException:
        # a start-up that fails after the process group exists tears it down before the error ends the process:
        # left to interpreter exit, its background threads can abort the process (SIGABRT, "terminate called
        # without an active exception") instead of the named error's exit status
        pd.shutdown()
        raise
    return runtime, transport, ctx


def run_worker(opts: RunOptions, where: Placement) -> int:
    """Every rank but the driver: join, then serve steps (a stage's leader) or run what the leader shares (its other
    tensor ranks) until the driver sends 'stop'."""
    ckpt = open_source(opts)
    grid = opts.grid(ckpt.cfg)
    plan = make_plan(ckpt.cfg, opts, grid)
    runtime, transport, ctx = _join(opts, ckpt, plan, grid, _checked_world(grid, where))
    try:
        if runtime.leads:
            serve_stage(runtime, transport, is_last=ctx.is_last)
        else:
            follow_stage(runtime, ctx.peers, ctx.rank)
    finally:
        pd.shutdown()
    return 0


def torchrun_worker(opts: RunOptions) -> int | None:
    """Under torchrun every rank runs the same command: ranks other than 0 serve their stage here and return an
    exit status; rank 0 (the driver) gets None and goes on."""
    if not under_torchrun() or torchrun_placement().rank == 0:
        return None
    return run_worker(opts, torchrun_placement())
