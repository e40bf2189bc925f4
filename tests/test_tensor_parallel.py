"""Tensor / expert parallelism inside a stage (parallel/): each rank's shard, read from the checkpoint slice by slice,
and the all-reduces that complete them, equal the whole model.

The ranks here are threads of one process that meet in a summing barrier (the all-reduce); the same sharding in
separate processes over gloo is tests/test_grid.py.
"""

from __future__ import annotations

import threading

import pytest
import torch

from checkpoint_testlib import L, small_cfg, stage_model
from qwen_vl_distributed.checkpoint.index import open_checkpoint
from qwen_vl_distributed.checkpoint.loader import load_stage
from qwen_vl_distributed.checkpoint.safetensors_io import ShardReader
from qwen_vl_distributed.checkpoint.shards import ShardBoundaryError
from qwen_vl_distributed.checkpoint.synth_weights import write_synthetic_weights
from qwen_vl_distributed.model.batch import SeqLayout
from qwen_vl_distributed.model.config import QuantizationConfig
from qwen_vl_distributed.parallel.grid import Grid, GridError, check_grid, heads_of, resolve_moe
from qwen_vl_distributed.parallel.shard import attach_reduce, shard_stage

BLOCK = (16, 16)


class ThreadSum:
    """An all-reduce for ranks that are threads: each rank's tensor becomes the sum of all, in rank order."""

    def __init__(self, n: int):
        self.parts: list = [None] * n
        self.barrier = threading.Barrier(n, timeout=120)

    def reduce_for(self, rank: int):
        def reduce(x: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = x.clone()
            self.barrier.wait()
            total = self.parts[0].clone()
            for p in self.parts[1:]:
                total += p
            self.barrier.wait()  # every rank has read the parts before any writes the next
            return x.copy_(total)
        return reduce


def _cfg(**text):
    import dataclasses

    cfg = small_cfg(**text)
    return dataclasses.replace(cfg, quantization=QuantizationConfig(weight_block_size=BLOCK))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """One checkpoint per expert layout, fp8 (per expert, 16x16 blocks), and tied embeddings (no lm_head.weight
    stored: the head is read from the embedding) -- the same shapes for all."""
    import dataclasses

    out = {}
    for name, layout, fp8 in (("hf", "hf", False), ("released", "released", False),
                              ("per-expert", "per-expert", False), ("fp8", "per-expert", True),
                              ("tied", "hf", False)):
        d = tmp_path_factory.mktemp(name)
        cfg = dataclasses.replace(_cfg(), tie_word_embeddings=name == "tied")
        write_synthetic_weights(d, cfg, seed=3, layout=layout, fp8=fp8, shard_bytes=150_000)
        out[name] = d
    return out


def _load(d, grid: Grid | None = None, rank: int = 0, keep_fp8: bool = False):
    ckpt = open_checkpoint(d)
    m = stage_model(ckpt.cfg)
    shards = shard_stage(m, grid, rank) if grid else {}
    if keep_fp8:
        m.keep_experts_fp8(ckpt.cfg.quantization.weight_block_size)
    load_stage(m, ckpt, progress=False, shards=shards)
    return m.eval()


def _steps(m) -> list[torch.Tensor]:
    """A 10-token prompt, then two decode steps of greedy tokens: the logits of each step. The KV cache is paged in
    blocks of 4 tokens, the sequence's blocks out of order (each rank's pool holds the kv heads it holds)."""
    ids = [5, 300, 17, 42, 9, 100, 7, 250, 3, 11]
    cache = m.new_cache(8, 4, 32)
    table = [[5, 2, 7]]
    out = []
    with torch.no_grad():
        logits = m(positions=torch.arange(10).expand(3, -1), layout=SeqLayout(table, [0], [10]), cache=cache,
                   input_ids=torch.tensor(ids))
        out.append(logits)
        for n in (10, 11):
            tok = logits.argmax(-1)
            logits = m(positions=torch.full((3, 1), n), layout=SeqLayout(table, [n], [1]), cache=cache, input_ids=tok)
            out.append(logits)
    return out


def _run_ranks(models) -> list[list[torch.Tensor]]:
    group = ThreadSum(len(models))
    for r, m in enumerate(models):
        attach_reduce(m, group.reduce_for(r))
    results, errors = [None] * len(models), []

    def run(r):
        try:
            results[r] = _steps(models[r])
        except BaseException as e:  # surfaced below, not lost in the thread
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("ckpt,tp,moe,keep", [
    ("hf", 2, "tp", False),           # kv heads split (2 over 2 ranks)
    ("hf", 4, "ep", False),           # kv heads replicated (2 over 4 ranks), 2 experts a rank
    ("released", 2, "ep", False),     # transposed fused experts, sliced as stored
    ("released", 4, "tp", False),     # ... their columns: 8 of 32 per rank
    ("per-expert", 2, "tp", False),
    ("per-expert", 4, "ep", False),   # a rank opens only its experts' tensors
    ("fp8", 2, "tp", False),          # fp8 dequantised at load: slices on block boundaries, scales sliced too
    ("fp8", 2, "tp", True),           # fp8 experts kept fp8: each rank's scales in its slice's place
    ("fp8", 4, "ep", True),
    ("tied", 2, "tp", False),         # the head, whole on every rank, read from the embedding matrix
])
def test_sharded_ranks_together_equal_the_whole_model(ckpts, ckpt, tp, moe, keep):
    whole = _steps(_load(ckpts[ckpt], keep_fp8=keep))
    grid = Grid(1, tp, moe)
    ranks = _run_ranks([_load(ckpts[ckpt], grid, r, keep) for r in range(tp)])
    for r in range(tp):
        for got, want in zip(ranks[r], whole):
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (r, (got - want).abs().max())
        assert all(torch.equal(a, b) for a, b in zip(ranks[r], ranks[0]))  # every rank holds the same result


def test_shards_have_local_shapes_and_heads():
    cfg = _cfg()
    m = stage_model(cfg)
    shards = shard_stage(m, Grid(1, 4, "tp"), 3)
    attn, experts = m.model.language_model.layers["0"].self_attn, m.model.language_model.layers["0"].mlp.experts
    assert (attn.num_heads, attn.num_kv_heads) == (1, 1)                 # 4 heads / 4; 2 kv heads replicated
    assert attn.q_proj.weight.shape == (16, 64) and attn.o_proj.weight.shape == (64, 16)
    assert experts.gate_up_proj.shape == (8, 16, 64) and experts.down_proj.shape == (8, 64, 8)
    assert shards[L + "0.mlp.experts.gate_up_proj"].ranges == ((24, 32), (56, 64))  # its gate rows, its up rows
    assert shards[L + "0.self_attn.k_proj.weight"].ranges == ((16, 32),)           # rank 3 uses kv head 1
    assert L + "0.mlp.gate.weight" not in shards and L + "0.input_layernorm.weight" not in shards


def test_an_expert_parallel_rank_reads_only_its_experts(ckpts, monkeypatch):
    read: list[str] = []
    orig = ShardReader.read
    monkeypatch.setattr(ShardReader, "read",
                        lambda self, info, index=None: read.append(info.name) or orig(self, info, index))
    _load(ckpts["per-expert"], Grid(1, 4, "ep"), 1)
    experts = {int(k.split(".")[6]) for k in read if ".mlp.experts." in k}
    assert experts == {2, 3}


def test_a_tensor_rank_reads_slices_not_whole_tensors(ckpts, monkeypatch):
    """The bytes all ranks read of a sharded tensor add up to the tensor (attention, experts): no rank holds the
    whole of one in memory."""
    sizes: dict[str, int] = {}
    orig = ShardReader.read

    def counting(self, info, index=None):
        t = orig(self, info, index)
        if ".self_attn.q_proj" in info.name or ".mlp.experts." in info.name:
            assert index is not None and t.numel() < info.numel, info.name
        sizes[info.name] = sizes.get(info.name, 0) + t.numel()
        return t

    monkeypatch.setattr(ShardReader, "read", counting)
    for r in range(2):
        _load(ckpts["released"], Grid(1, 2, "tp"), r)
    key = L + "0.mlp.experts.gate_up_proj"
    assert sizes[key] == 8 * 64 * 64  # [E, H, 2I] in all, read as two halves of its columns per rank


def test_a_shard_boundary_inside_an_fp8_block_is_refused_by_name(ckpts, monkeypatch):
    """Width 32 over 4 ranks is 8 rows each, inside the checkpoint's 16-row blocks: refused before any data."""
    monkeypatch.setattr(ShardReader, "read", lambda *a, **k: pytest.fail("read data before refusing"))
    with pytest.raises(ShardBoundaryError, match=r"experts\.\d+\.gate_proj\.weight .*16-wide blocks"):
        _load(ckpts["fp8"], Grid(1, 4, "tp"), 1)


def test_grids_the_shapes_do_not_allow_are_refused_by_name():
    cfg = _cfg()  # 4 heads, 2 kv heads, 8 experts of width 32
    with pytest.raises(GridError, match="4 attention heads do not split into 3"):
        check_grid(cfg, Grid(1, 3, "ep"))
    with pytest.raises(GridError, match="8 experts do not split into 16"):
        check_grid(small_cfg(num_attention_heads=16, num_key_value_heads=16), Grid(1, 16, "ep"))
    assert heads_of(cfg, 4, 2) == ((2, 3), (1, 2))  # kv head 1 serves query heads 2 and 3
    assert resolve_moe(cfg, 4, "auto", (16, 16)) == "ep"  # width 8 per rank would split fp8 blocks
    assert resolve_moe(cfg, 2, "auto", (16, 16)) == "tp"


def _sharded_layer(ckpts, tp: int, moe: str):
    """Layer 0 of the whole model, and of each rank's shard (fp32, fast paths registered)."""
    from qwen_vl_distributed.kernels import register

    register()
    whole = _load(ckpts["hf"])
    ranks = [_load(ckpts["hf"], Grid(1, tp, moe), r) for r in range(tp)]
    return whole, [m.model.language_model.layers["0"] for m in ranks]


@pytest.mark.parametrize("tp,moe", [(2, "ep"), (4, "tp")])
def test_fused_layer_shards_compute_their_partial_sums(ckpts, tp, moe):
    """The fused layer kernels (the decode step CUDA graphs replay) on each rank's shard: its partial o_proj and MoE
    outputs go to the layer's reduce, and they sum to the whole layer's. The ranks run one after the other, each
    reduce answering with the whole layer's output, so each rank continues exactly as after a real all-reduce."""
    pytest.importorskip("triton")
    from qwen_vl_distributed.kernels.decode_layer import decode_layer
    from qwen_vl_distributed.model.rope import text_rope_tables

    whole, layers = _sharded_layer(ckpts, tp, moe)
    t = whole.cfg.text
    layer = whole.model.language_model.layers["0"]
    h = torch.randn(3, t.hidden_size)
    pos = torch.tensor([3, 7, 0]).expand(3, -1)
    rope = text_rope_tables(pos, t.head_dim, t.rope_theta, t.mrope_section, torch.float32)
    layout = SeqLayout([[2], [0], [1]], starts=[3, 7, 0], lens=[1, 1, 1])  # one block of 16 per sequence
    with torch.no_grad():
        attn = layer.self_attn(layer.input_layernorm(h), rope, whole.new_cache(4, 16).layer(0), layout)
        moe_out = layer.mlp(layer.post_attention_layernorm(h + attn))
        want = h + attn + moe_out
        partials = []
        for lay in layers:
            answers = iter([attn, moe_out])
            lay.self_attn.reduce = lay.mlp.reduce = lambda x: partials.append(x.clone()) or next(answers).clone()
            cache = _local_cache(lay, 4, 16)
            got = decode_layer(lay, h, *rope, cache, layout.block_table("cpu"), layout.tensor("starts", "cpu"),
                               layout.row_tables("cpu", 16))
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert torch.allclose(sum(partials[0::2]), attn, atol=1e-5)
    assert torch.allclose(sum(partials[1::2]), moe_out, atol=1e-5)


def _local_cache(layer, blocks: int, block_size: int):
    a = layer.self_attn
    shape = (blocks, a.num_kv_heads, block_size, a.head_dim)
    return torch.zeros(shape), torch.zeros(shape)


@pytest.mark.parametrize("impl", ["triton", "grouped", "reference"])
def test_experts_of_other_ranks_add_nothing_in_every_impl(ckpts, impl):
    """Expert parallel: each rank's experts impl gets the router's pairs with the experts held elsewhere as id E;
    the ranks' outputs sum to all experts' output."""
    from qwen_vl_distributed.kernels.grouped import grouped_experts, has_grouped_mm
    from qwen_vl_distributed.model.moe import reference_experts, route

    if impl == "triton":
        pytest.importorskip("triton")
        from qwen_vl_distributed.kernels.moe_triton import fused_experts as fn
    elif impl == "grouped":
        if not has_grouped_mm():
            pytest.skip("no grouped_mm in this torch")
        fn = grouped_experts
    else:
        fn = reference_experts
    whole, layers = _sharded_layer(ckpts, 4, "ep")
    mlp = whole.model.language_model.layers["0"].mlp
    x = torch.randn(6, whole.cfg.text.hidden_size)
    w, ids = route(mlp.gate(x), mlp.top_k, mlp.normalize)
    with torch.no_grad():
        want = reference_experts(x, ids, w, mlp.experts.gate_up_proj, mlp.experts.down_proj)
        total = torch.zeros_like(want)
        for lay in layers:
            e = lay.mlp.experts
            lids, lw = e.local_routing(ids, w)
            total += fn(x, lids, lw, e.gate_up_proj, e.down_proj)
    assert torch.allclose(total, want, atol=1e-5), (total - want).abs().max()


def test_ranks_that_share_a_gpu_share_its_memory_in_the_plan(monkeypatch):
    """More ranks on this machine than GPUs (they then share one: pipeline.distributed.stage_device): the default
    budget is the GPU's memory divided among them, so the KV pool that fills the rest is not counted twice."""
    import types

    from qwen_vl_distributed.engine.build import RunOptions, make_plan
    from qwen_vl_distributed.model.config import preset

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=8e9))
    cfg = preset("tiny")
    budgets = {tp: make_plan(cfg, RunOptions(model="-", device="cuda", dtype="bfloat16", tensor_parallel=tp,
                                             max_len=64, max_batch=2)).stages[0].budget_bytes for tp in (1, 2)}
    assert budgets[1] == 8e9 and budgets[2] == 4e9


def test_a_heartbeat_to_a_dead_tensor_rank_is_a_named_stage_failure():
    """The leader's heartbeats and 'stop' go to its tensor ranks through the group: a closed connection there ends
    the run with the stage's ranks named, as one in a step does."""
    from qwen_vl_distributed.pipeline.stage import StageRuntime
    from qwen_vl_distributed.pipeline.transport import StageFailure

    class DeadGroup:
        grid, stage, tp_rank, ranks, is_leader = Grid(1, 2), 0, 0, [0, 1], True

        def share(self, header, tensors):
            raise RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")

    m = stage_model(small_cfg(), vision=False, head=False)  # (meta: nothing runs)
    runtime = StageRuntime(m, None, None, torch.device("cpu"), 0, DeadGroup())
    with pytest.raises(StageFailure, match=r"a collective of stage 0 \(ranks 0-1\) failed: a tensor rank died"):
        runtime.signal("heartbeat")
