"""The sections of ``qwen-vl bench`` (see cli/bench.py): each fills ``Bench.results`` and never asserts timings.

Shapes: B decode batch, T prompt tokens, ctx cached tokens per sequence, H hidden, V vocab, N decoder layers built.
Our decode runs under CUDA-graph replay (runtime.cuda_graph); HF runs as a user would call it (eager, dynamic
cache, grouped_mm experts, sdpa attention). "Per layer" numbers come from a layers-only stage (no embedding, no
head) on both sides; the whole-model step (embedding + layers + lm_head) is timed too.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import statistics
import sys
from dataclasses import dataclass

import torch

from ..model.attention import reference_cache_attention
from ..model.batch import SeqLayout
from ..model.config import preset
from ..model.moe import reference_experts, route
from ..model.qwen3_vl import Qwen3VLMoe
from ..kernels import enable_fast_paths, module_layers, register, use_reference
from ..kernels.choices import DEFAULT, KernelChoices
from .models import (build_pair, decode_layer_bytes, default_dtype, kv_cache, ours_from, prefill_layer_flops,
                     prefill_layer_floor, randomize_, set_hf_experts, vision_flops)
from ..runtime.cuda_graph import DecodeGraphs
from ..pipeline.plan import DEFAULT_KV_BLOCK_SIZE
from .timing import copy_bandwidth_gbs, cuda_time, matmul_tflops, step_times

BF16 = torch.bfloat16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def versions() -> dict:
    import transformers
    import triton

    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"device": p.name, "sms": p.multi_processor_count, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "triton": triton.__version__,
            "transformers": transformers.__version__}


@dataclass(frozen=True)
class BenchOptions:
    """What ``qwen-vl bench`` runs (cli/bench.py documents each option)."""

    preset: str = "235b-a22b"
    layers: int = 4
    batches: tuple[int, ...] = (1, 8, 32)
    context: int = 512
    prefill: tuple[int, ...] = (2048, 8192)
    image: int = 1024
    greedy_tokens: int = 16
    skip_hf: bool = False
    tune: bool = True
    seed: int = 0
    device: str = "cuda"
    tp: tuple[int, ...] = (1, 2, 4, 8)  # the 'tp' section: tensor-parallel sizes whose one-rank shard it times
    allreduce_us: float = 15.0  # the 'tp' section's projection: one all-reduce's latency (an input, not measured)
    kv_block_size: int = DEFAULT_KV_BLOCK_SIZE  # tokens per KV block (the decode section also times a contiguous cache beside it)


class Bench:
    """The sections' shared state. Its models are built on first use (a run of the 'tp' section alone builds only
    its shards); the kernels' choices it has measured (``self.choices``) are passed to every model it builds."""

    def __init__(self, opts: BenchOptions):
        self.opts = opts
        base = preset(opts.preset)
        self.full_layers = base.text.num_hidden_layers
        self.cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, num_hidden_layers=opts.layers))
        self.n = opts.layers
        self.dev = torch.device(opts.device)
        if self.dev.type == "cuda" and self.dev.index is None:
            self.dev = torch.device("cuda", torch.cuda.current_device())
        self.batches = sorted(set(opts.batches))
        self.results: dict = {"command": "qwen-vl " + " ".join(sys.argv[1:]), "versions": versions(),
                              "preset": opts.preset, "layers": self.n, "context": opts.context}
        self.choices: KernelChoices = DEFAULT
        torch.manual_seed(opts.seed)
        torch.set_grad_enabled(False)

    def choose(self, choices: KernelChoices) -> None:
        """Run the fast paths with ``choices`` from now on (the registries are re-bound to them)."""
        self.choices = choices
        register(choices)

    @functools.cached_property
    def _pair(self):
        register(self.choices)
        if self.opts.skip_hf:
            with default_dtype(BF16), torch.device(self.dev):
                ours = Qwen3VLMoe(self.cfg).eval()
            randomize_(ours, self.opts.seed, self.cfg.text.hidden_size)
            return None, enable_fast_paths(ours, choices=self.choices)
        hf, ours = build_pair(self.cfg, self.dev, self.opts.seed)
        return hf, enable_fast_paths(ours, choices=self.choices)

    @property
    def hf(self):
        return self._pair[0]

    @property
    def ours(self) -> Qwen3VLMoe:
        return self._pair[1]

    @functools.cached_property
    def mid(self) -> Qwen3VLMoe:
        """A layers-only stage (no embedding, no head) over the same weights as ``ours``."""
        return enable_fast_paths(ours_from(self.cfg, self.ours.state_dict(), layers=(0, self.n), vision=False,
                                           embed=False, head=False), choices=self.choices)

    # -- ceilings -------------------------------------------------------------------------------------------------
    def section_ceilings(self):
        """Measured at the start and again at the end of the run (``finish``); the larger value is the ceiling,
        so fractions of it are never flattered by a slow moment."""
        c = self.results.setdefault("ceilings", {"copy_gbs_samples": [], "matmul_tflops_samples": []})
        c["copy_gbs_samples"].append(copy_bandwidth_gbs(4.0))
        c["matmul_tflops_samples"].append(matmul_tflops(8192))
        c["copy_gbs"] = max(c["copy_gbs_samples"])
        c["matmul_tflops"] = max(c["matmul_tflops_samples"])

    def finish(self):
        if "ceilings" in self.results:
            self.section_ceilings()
            for row in self.results.get("decode", {}).values():
                row["ours_frac_copy_bw"] = row["ours_gbs"] / self.results["ceilings"]["copy_gbs"]
            for row in self.results.get("prefill", {}).values():
                peak = self.results["ceilings"]["matmul_tflops"]
                row["ours_mfu"] = row["ours_tflops"] / peak
                if "hf_tflops" in row:
                    row["hf_mfu"] = row["hf_tflops"] / peak

    def _ceilings(self) -> dict:
        if "ceilings" not in self.results:
            self.section_ceilings()
        return self.results["ceilings"]

    # -- parity ---------------------------------------------------------------------------------------------------
    def section_parity(self):
        par = self.results.setdefault("parity", {})
        par["kernels"] = self._kernel_checks()
        if self.hf is not None:
            par["logits"] = self._logits_parity()
            par["greedy"] = self._greedy_parity()

    def _kernel_checks(self) -> dict:
        """Each fast kernel against its reference on real shapes, bf16, layer 0's weights."""
        from ..kernels.decode_attention import decode_attention
        from ..kernels.grouped import grouped_experts
        from ..kernels.moe_triton import fused_experts

        t = self.cfg.text
        layer = self.mid.model.language_model.layers["0"]
        gu, dn = layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj
        out = {}
        for n in self.batches + [2048]:
            x = torch.randn(n, t.hidden_size, device=self.dev, dtype=BF16)
            w, ids = route(layer.mlp.gate(x), t.num_experts_per_tok, t.norm_topk_prob)
            ref = reference_experts(x, ids, w, gu, dn)
            for fast in (fused_experts, grouped_experts) if n == 2048 else (fused_experts,):
                out[f"moe_{fast.__name__}_T{n}"] = rel(fast(x, ids, w, gu, dn), ref)
        cache, tables = kv_cache(self.mid, 5, 1024, self.opts.kv_block_size)
        kc, vc = cache.layer(0)
        layout = SeqLayout([tables[i] for i in (4, 0, 2, 1)], starts=[0, 100, 511, 1023], lens=[1, 1, 1, 1])
        q = torch.randn(4, t.num_attention_heads, t.head_dim, device=self.dev, dtype=BF16)
        s = t.head_dim**-0.5
        got = decode_attention(q, kc, vc, layout.block_table(self.dev), layout.tensor("starts", self.dev), s)
        out["decode_attention"] = rel(got, reference_cache_attention(q, kc, vc, layout, s))
        from ..kernels.extend_attention import extend_attention

        # a whole prompt, a chunk after a cached prefix, a decode row: one mixed step over the cache
        layout = SeqLayout([tables[i] for i in (3, 0, 2)], starts=[0, 700, 1000], lens=[300, 300, 1])
        q = torch.randn(601, t.num_attention_heads, t.head_dim, device=self.dev, dtype=BF16)
        got = extend_attention(q, kc, vc, layout, s)
        out["extend_attention"] = rel(got, reference_cache_attention(q.float(), kc.float(), vc.float(), layout, s))
        out.update(self._decode_layer_checks())
        out.update(self._vision_attention_checks())
        out["tolerance"] = 1e-2
        out["pass"] = all(v < 1e-2 for k, v in out.items() if k != "tolerance" and "rows_over" not in k
                          and "mismatch" not in k)
        return out

    def _decode_layer_checks(self) -> dict:
        """kernels.decode_layer (the fused decode step) against the module's forward, same inputs and cache."""
        from ..kernels.decode_layer import decode_layer, rmsnorm

        t = self.cfg.text
        layer = self.mid.model.language_model.layers["0"]
        out = {}
        bs = self.opts.kv_block_size
        for b in self.batches:
            cache, tables = kv_cache(self.mid, b, 1024, bs)
            fused_cache, _ = kv_cache(self.mid, b, 1024, bs, fill=False)
            fused_cache.k[0].copy_(cache.k[0])
            fused_cache.v[0].copy_(cache.v[0])
            starts = torch.randint(0, 1000, (b,)).tolist()
            layout = SeqLayout(tables, starts, [1] * b)
            pos = torch.tensor(starts, device=self.dev).expand(3, b)
            rope = DecodeGraphs(self.mid, cache, buckets=(b,))._rope(pos)
            h = torch.randn(b, t.hidden_size, device=self.dev, dtype=BF16)
            with module_layers(self.mid):
                ref = layer(h, rope, cache.layer(0), layout)
            got = decode_layer(layer, h, *rope, fused_cache.layer(0), layout.block_table(self.dev),
                               layout.tensor("starts", self.dev), layout.row_tables(self.dev, bs), self.choices)
            rows = ((got.double() - ref.double()).norm(dim=1) / ref.double().norm(dim=1)).tolist()
            out[f"decode_layer_B{b}"] = statistics.median(rows)  # per-row median: a near-tie in routing can
            out[f"decode_layer_B{b}_rows_over_1e-2"] = float(sum(r > 1e-2 for r in rows))  # flip one row's experts
            out[f"decode_layer_kcache_B{b}"] = rel(fused_cache.k[0], cache.k[0])
        norm = layer.input_layernorm
        x = torch.randn(8, t.hidden_size, device=self.dev, dtype=BF16)
        out["rmsnorm_mismatch_frac"] = float((rmsnorm(x, norm.weight, norm.eps) != norm(x)).float().mean())
        return out

    def _vision_attention_checks(self) -> dict:
        """The fused rotary (bit for bit) and the 'fast' vision attention core against the references."""
        from ..model.rope import vision_rope_tables
        from ..model.vision import reference_vision_attention, vision_rotary
        from ..kernels.vision_attention import fast_vision_attention
        from ..kernels.vision_block import fused_vision_block
        from ..kernels.vision_rotary import rotate_qk

        v, n = self.cfg.vision, 1024
        heads, s = v.num_heads, v.head_dim**-0.5
        qkv = torch.randn(n, 3 * v.hidden_size, device=self.dev, dtype=BF16)
        idx = torch.arange(n, device=self.dev)
        rope = vision_rope_tables(idx // 32, idx % 32, v.head_dim, v.rope_theta)
        q, k = rotate_qk(qkv, rope, heads)
        ref_q, ref_k, _ = qkv.view(n, 3, heads, -1).unbind(1)
        mismatch = (q != vision_rotary(ref_q, rope)).sum() + (k != vision_rotary(ref_k, rope)).sum()
        cu = [0, 256, 1024]  # two segments
        block = self.ours.model.visual.blocks[0]
        x = torch.randn(n, v.hidden_size, device=self.dev, dtype=BF16)
        return {"vision_rotary_mismatch_frac": float(mismatch) / (2 * q.numel()),
                "vision_attention": rel(fast_vision_attention(qkv, rope, cu, heads, s),
                                        reference_vision_attention(qkv, rope, cu, heads, s)),
                "vision_fused_block": rel(fused_vision_block(block, x, rope, cu), block(x, rope, cu))}

    def _prompt(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.opts.seed + 7)
        return torch.randint(0, 150000, (n,), generator=g).to(self.dev)  # below the special/vision token ids

    def _ours_logits(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.numel()
        pos = torch.arange(n, device=self.dev).expand(3, n)
        cache, tables = kv_cache(self.ours, 1, n, self.opts.kv_block_size, fill=False)
        return self.ours(positions=pos, layout=SeqLayout(tables, [0], [n]), cache=cache, input_ids=ids,
                         logits_rows=list(range(n)))

    def _logits_parity(self, n: int = 64) -> dict:
        """Logits of a 64-token prompt at every position: ours (fast and reference) vs HF (grouped_mm and eager).
        bf16 noise is what two valid bf16 implementations disagree by: HF eager vs HF grouped_mm, and our
        reference vs HF. Tolerance: our fast path within 2x the larger of the two, and never below 2^-8 (one bf16
        rounding of the logits), so that two near-identical references do not make the bar unreachably low."""
        ids = self._prompt(n)
        hf_g = self.hf(input_ids=ids[None]).logits[0].float()
        set_hf_experts(self.hf, "eager")
        hf_e = self.hf(input_ids=ids[None]).logits[0].float()
        set_hf_experts(self.hf, "grouped_mm")
        use_reference(self.ours)
        ours_ref = self._ours_logits(ids)
        enable_fast_paths(self.ours, choices=self.choices)
        with module_layers(self.ours):
            ours_module = self._ours_logits(ids)  # the modules' layers around the fast attention and experts
        ours_fast = self._ours_logits(ids)  # the fused layers: what runs
        noise = max(rel(hf_e, hf_g), rel(ours_ref, hf_g))
        res = {"rel_fast_vs_hf": rel(ours_fast, hf_g), "rel_ref_vs_hf": rel(ours_ref, hf_g),
               "rel_module_fast_vs_hf": rel(ours_module, hf_g),
               "rel_hf_eager_vs_grouped": rel(hf_e, hf_g), "rel_fast_vs_ref": rel(ours_fast, ours_ref),
               "max_abs_fast_vs_hf": float((ours_fast - hf_g).abs().max()),
               "logit_std": float(hf_g.std()),
               "top1_agree": float((ours_fast.argmax(-1) == hf_g.argmax(-1)).float().mean()),
               "tolerance": max(2 * noise, 2.0**-8)}
        res["pass"] = res["rel_fast_vs_hf"] <= res["tolerance"] and res["rel_module_fast_vs_hf"] <= res["tolerance"]
        return res

    def _greedy_parity(self, n: int = 64) -> dict:
        """Greedy tokens after a 64-token prompt: HF (its forward in a loop, dynamic cache) vs ours (fast prefill,
        then decode steps replayed from a CUDA graph of the whole model)."""
        steps = self.opts.greedy_tokens
        ids = self._prompt(n)
        out = self.hf(input_ids=ids[None], use_cache=True)
        pkv, hf_tokens = out.past_key_values, [int(out.logits[0, -1].argmax())]
        hf_logits = []
        for _ in range(steps - 1):
            out = self.hf(input_ids=torch.tensor([[hf_tokens[-1]]], device=self.dev), past_key_values=pkv,
                          use_cache=True)
            hf_tokens.append(int(out.logits[0, -1].argmax()))
            hf_logits.append(out.logits[0, -1].float())
        cache, tables = kv_cache(self.ours, 1, n + steps + 1, self.opts.kv_block_size, fill=False)
        logits = self.ours(positions=torch.arange(n, device=self.dev).expand(3, n), layout=SeqLayout(tables, [0], [n]),
                           cache=cache, input_ids=ids)
        ours_tokens = [int(logits[0].argmax())]
        graphs = DecodeGraphs(self.ours, cache, buckets=(1,), choices=self.choices)
        graphs.capture()
        step_rel = []
        for i in range(steps - 1):
            pos = n + i
            step = graphs.run(positions=torch.full((3, 1), pos), layout=SeqLayout(tables, [pos], [1]),
                              input_ids=torch.tensor([hf_tokens[i]]))  # teacher-forced: same inputs as HF
            ours_tokens.append(int(step[0].argmax()))
            step_rel.append(rel(step[0], hf_logits[i]))
        ref_rel = self._reference_decode_rel(ids, hf_tokens, hf_logits)
        res = {"hf": hf_tokens, "ours": ours_tokens, "identical": hf_tokens == ours_tokens,
               "decode_logits_rel_vs_hf_max": max(step_rel, default=0.0),
               "decode_logits_rel_vs_hf_mean": statistics.mean(step_rel) if step_rel else 0.0,
               "reference_decode_rel_vs_hf_max": max(ref_rel, default=0.0),
               "reference_decode_rel_vs_hf_mean": statistics.mean(ref_rel) if ref_rel else 0.0}
        res["tolerance_mean"] = max(2 * res["reference_decode_rel_vs_hf_mean"], 2.0**-8)
        res["pass"] = res["identical"] and res["decode_logits_rel_vs_hf_mean"] <= res["tolerance_mean"]
        return res

    def _reference_decode_rel(self, ids: torch.Tensor, tokens: list[int], hf_logits: list[torch.Tensor]):
        """The bf16 noise of a decode step: our plain reference path (module forward, reference impls, no graph)
        teacher-forced on HF's tokens, each step's logits against HF's."""
        n = ids.numel()
        use_reference(self.ours)
        try:
            cache, tables = kv_cache(self.ours, 1, n + len(tokens) + 1, self.opts.kv_block_size, fill=False)
            self.ours(positions=torch.arange(n, device=self.dev).expand(3, n), layout=SeqLayout(tables, [0], [n]),
                      cache=cache, input_ids=ids)
            out = []
            for i, want in enumerate(hf_logits):
                pos = n + i
                got = self.ours(positions=torch.full((3, 1), pos, device=self.dev),
                                layout=SeqLayout(tables, [pos], [1]), cache=cache,
                                input_ids=torch.tensor([tokens[i]], device=self.dev))
                out.append(rel(got[0], want))
            return out
        finally:
            enable_fast_paths(self.ours, choices=self.choices)

    # -- decode ---------------------------------------------------------------------------------------------------
    def section_decode(self):
        """The layers-only stage's decode step per batch, under graph replay over the paged KV cache; the same
        step over a contiguous cache (one block per sequence: no table lookup per key) is timed in turn with it,
        so their ratio is what paging costs."""
        ctx = self.opts.context
        if self.opts.tune:
            self._tune_moe()
            self.results["gemv_tuning"] = self._tune_gemv(self.batches[0])
        graphs, tables = self._decode_graphs(self.mid, self.opts.kv_block_size)
        unique = {b: self._unique_experts(graphs, tables, b, ctx) for b in self.batches}
        graphs.capture()
        flat, flat_tables = self._decode_graphs(self.mid, None)
        flat.capture()
        rows = {}
        for b in self.batches:
            ms, flat_ms = self._paired_decode_ms((graphs, tables), (flat, flat_tables), b, ctx)
            by = decode_layer_bytes(self.cfg, unique[b], b, ctx)
            r = {"ours_step_ms": ms, "ours_ms_layer": ms / self.n, "unique_experts": unique[b],
                 "bytes_layer": by, "ours_gbs": by / (ms / self.n * 1e-3) / 1e9, "contiguous_kv_step_ms": flat_ms,
                 "paged_over_contiguous": ms / flat_ms}
            r["ours_frac_copy_bw"] = r["ours_gbs"] / self._ceilings()["copy_gbs"]
            if self.hf is not None:
                r["hf_text_model_direct_step_ms"] = self._hf_decode_layers(b, ctx)
            rows[b] = r
        self.results["kv_block_size"] = self.opts.kv_block_size
        flat = flat_tables = None
        self.results["decode_pdl"] = self._pdl_decode(graphs, tables, ctx)
        self.results["decode_norm_fusion"] = self._norm_fusion_decode(graphs, tables, ctx)
        self.results["decode_variants"] = self._variant_decode(graphs, tables, ctx)
        self.results["decode_breakdown"] = {b: self._decode_breakdown(graphs, tables, b, ctx)
                                            for b in (self.batches[0], self.batches[-1])}
        graphs = None  # free this stage's graphs before the whole-model ones are captured
        self._full_decode(rows, ctx)
        self.results["decode"] = rows

    def _decode_graphs(self, model, block_size: int | None, choices: KernelChoices | None = None
                       ) -> tuple[DecodeGraphs, list[list[int]]]:
        """Decode graphs of ``model`` for the benchmark's batch sizes over a random cache of max(batches)
        sequences of context + 8 tokens (paged in blocks of ``block_size``, or contiguous: None), and the
        sequences' block tables."""
        cache, tables = kv_cache(model, max(self.batches), self.opts.context + 8, block_size, self.opts.seed)
        return DecodeGraphs(model, cache, buckets=tuple(self.batches), choices=choices or self.choices), tables

    def _pdl_decode(self, graphs: DecodeGraphs, tables: list[list[int]], ctx: int) -> dict:
        """The decode step with the fused layer's kernels launched with programmatic dependent launch against the
        same step without it (kernels.pdl), timed in alternation; and whether the two give the same hidden
        states bit for bit."""
        from ..kernels.pdl import pdl_runs_on

        if not pdl_runs_on(self.dev):
            return {"skipped": "programmatic dependent launch needs compute capability 9.0+ and Triton's gdc"}
        ab = self._decode_ab(graphs, tables, ctx, dataclasses.replace(self.choices, pdl=not self.choices.pdl))
        res = {"pdl_in_default_choices": self.choices.pdl}
        for b, r in ab.items():
            pdl_ms, plain_ms = ((r["default_ms"], r["other_ms"]) if self.choices.pdl
                                else (r["other_ms"], r["default_ms"]))
            res[b] = {"plain_ms_layer": plain_ms / self.n, "pdl_ms_layer": pdl_ms / self.n,
                      "pdl_over_plain": pdl_ms / plain_ms, "equal": r["equal"], "rel": r["rel"]}
        return res

    def _norm_fusion_decode(self, graphs: DecodeGraphs, tables: list[list[int]], ctx: int) -> dict:
        """Per switch (``KernelChoices.norm_router_rows``: residual + norm + router in two launches, kernels.router;
        ``norm_qkv_rows``: the input norm inside the q/k/v GEMV, kernels.gemv): the decode step with that norm inside
        the next kernels against its own launch, timed in alternation, with how far apart their hidden states are
        (the fp32 sums run in another order, so not bit for bit)."""
        from ..kernels.choices import GEMV_MAX_ROWS

        res = {}
        for name in ("norm_router_rows", "norm_qkv_rows"):
            on = getattr(self.choices, name)
            other = 0 if on else min(max(self.batches), GEMV_MAX_ROWS)
            ab = self._decode_ab(graphs, tables, ctx, dataclasses.replace(self.choices, **{name: other}))
            res[name] = {"default": on}
            for b, r in ab.items():
                fused_ms, plain_ms = (r["default_ms"], r["other_ms"]) if on else (r["other_ms"], r["default_ms"])
                res[name][b] = {"plain_ms_layer": plain_ms / self.n, "fused_ms_layer": fused_ms / self.n,
                                "fused_over_plain": fused_ms / plain_ms, "fused_here": b <= max(on, other),
                                "equal": r["equal"], "rel": r["rel"]}
        return res

    def _variant_decode(self, graphs: DecodeGraphs, tables: list[list[int]], ctx: int) -> dict:
        """The decode step with each other launch variant against this run's, timed in alternation: programmatic
        dependent launch with the wait first (1) or the successor let go first (2, ``kernels.pdl.EARLY``), each with
        0, 1 or 2 weight tiles loaded before the wait (``KernelChoices.pre_wait``); the top-k by packed keys
        (``packed_topk``) turned over, and its kernel with one warp (``route_warps``); the K-sum in the down
        kernel's launch (``sum_in_down_rows``) turned over; the router in one launch (``router_one_launch``, with
        ``norm_router_rows``); the q/k post in the attention kernel (``qkv_post_in_attention``); and all of them
        together; and the GEMV kernel's pipeline at other depths (``gemv_stages``), its programs' warps
        (``gemv_warps``) and split-K (``gemv_split``). The
        one-warp top-k, the one-launch router, the q/k post and the split GEMV sum in fp32 over other tiles or
        warps, so their outputs may differ in the last bits (``rel``); the others should be identical. The launch
        variants need PDL (without it there is no wait to load before)."""
        from ..kernels.choices import GEMV_MAX_ROWS
        from ..kernels.pdl import pdl_runs_on

        here = (int(self.choices.pdl), self.choices.pre_wait)
        res = {"default": f"pdl {here[0]}, {here[1]} tiles, packed top-k {'on' if self.choices.packed_topk else 'off'}"}
        rows = min(max(self.batches), GEMV_MAX_ROWS)
        fold = 0 if self.choices.sum_in_down_rows else rows
        variants = {
            f"packed top-k {'off' if self.choices.packed_topk else 'on'}":
                dataclasses.replace(self.choices, packed_topk=not self.choices.packed_topk),
            f"K-sum {'apart' if fold == 0 else 'in the down launch'}":
                dataclasses.replace(self.choices, sum_in_down_rows=fold),
            "residual + norm + router + top-k in one launch":
                dataclasses.replace(self.choices, norm_router_rows=rows, router_one_launch=True),
            "q/k norm + rotary + cache write in the attention kernel":
                dataclasses.replace(self.choices, qkv_post_in_attention=True),
            "every launch variant on (pdl 1)":
                dataclasses.replace(self.choices, norm_router_rows=rows, router_one_launch=True, sum_in_down_rows=rows,
                                    packed_topk=True, pre_wait=2, pdl=1, qkv_post_in_attention=True)}
        for stages in (4, 6, 8):
            if stages != self.choices.gemv_stages:
                variants[f"GEMV pipeline of {stages} stages"] = dataclasses.replace(self.choices, gemv_stages=stages)
        for warps in (4, 8):
            if warps != self.choices.gemv_warps:
                variants[f"GEMV programs of {warps} warps"] = dataclasses.replace(self.choices, gemv_warps=warps)
                variants[f"GEMV programs of {warps} warps, 6 stages"] = dataclasses.replace(
                    self.choices, gemv_warps=warps, gemv_stages=6)
        for split in (1, 2, 4):
            if split != self.choices.gemv_split:
                variants[f"GEMV split-K over {split} programs"] = dataclasses.replace(self.choices, gemv_split=split)
        for warps in (1, 4):
            if warps != self.choices.route_warps:
                variants[f"top-k kernel with {warps} warps"] = dataclasses.replace(self.choices, route_warps=warps)
                variants[f"top-k kernel with {warps} warps, packed"] = dataclasses.replace(
                    self.choices, route_warps=warps, packed_topk=True)
        if pdl_runs_on(self.dev):
            for pdl, pre in ((1, 0), (1, 1), (1, 2), (2, 0), (2, 2)):
                if (pdl, pre) != here:
                    variants[f"pdl {pdl}, {pre} tiles before the wait"] = dataclasses.replace(
                        self.choices, pdl=pdl, pre_wait=pre)
        else:
            res["skipped"] = "the launch variants need programmatic dependent launch"
        for name, choices in variants.items():
            ab = self._decode_ab(graphs, tables, ctx, choices)
            res[name] = {b: {"default_ms_layer": r["default_ms"] / self.n, "other_ms_layer": r["other_ms"] / self.n,
                             "other_over_default": r["other_ms"] / r["default_ms"], "equal": r["equal"],
                             "rel": r["rel"]} for b, r in ab.items()}
        return res

    def _decode_ab(self, graphs: DecodeGraphs, tables: list[list[int]], ctx: int, other_choices: KernelChoices
                   ) -> dict:
        """Per batch: the decode step of ``graphs`` (this run's choices) and of graphs with ``other_choices``, ms
        per step timed in alternation, and whether (``equal``) / how far (``rel``) their hidden states differ."""
        # over the same cache and tables: both write the step's k/v into the same slot and read the same keys
        # (a second cache, or a capture's warm-up writing a real block, made the outputs differ without any race)
        other = DecodeGraphs(self.mid, graphs.cache, buckets=tuple(self.batches), choices=other_choices)
        other.capture()
        res = {}
        for b in self.batches:
            ms, other_ms = self._paired_decode_ms((graphs, tables), (other, tables), b, ctx)
            outs, x = [], torch.randn(b, self.cfg.text.hidden_size, device=self.dev, dtype=BF16)
            for g in (graphs, other):
                g.load(tables[:b], [ctx] * b, torch.full((3, b), ctx), hidden=x)
                outs.append(g.replay(b).clone())
            res[b] = {"default_ms": ms, "other_ms": other_ms, "equal": bool(torch.equal(*outs)),
                      "rel": rel(outs[1], outs[0])}
        return res

    def _paired_decode_ms(self, a: tuple, b_: tuple, b: int, ctx: int, rounds: int = 5) -> tuple[float, float]:
        """Median ms per replay of two graph sets ((graphs, tables) each) at batch b, timed in alternation so that
        a slow moment of the GPU weighs on both alike."""
        for graphs, tables in (a, b_):
            self._load(graphs, tables, b, ctx)
        times: tuple[list, list] = ([], [])
        for _ in range(rounds):
            for (graphs, _), out in zip((a, b_), times):
                out.append(cuda_time(lambda: graphs.replay(b), iters=20, reps=3))
        return statistics.median(times[0]), statistics.median(times[1])

    def _decode_breakdown(self, graphs: DecodeGraphs, tables: list[list[int]], b: int, ctx: int) -> dict:
        """Microseconds per layer of each launch group of the fused decode step, each captured alone in a CUDA
        graph over all N layers (weights rotate past L2); the sum against the whole step shows the gaps."""
        from ..kernels.decode_attention import decode_attention
        from ..kernels.decode_layer import project, qkv_post, rmsnorm, route as fused_route
        from ..kernels.moe_triton import expert_pairs, sum_pairs
        from ..kernels.router import norm_route
        import torch.nn.functional as F

        t = self.cfg.text
        layers = [self.mid.model.language_model.layers[str(i)] for i in self.mid.layer_ids]
        kvs = [graphs.cache.layer(i) for i in self.mid.layer_ids]
        h = torch.randn(b, t.hidden_size, device=self.dev, dtype=BF16)
        self._load(graphs, tables, b, ctx)  # the static buffers: block tables, starts, where the new k/v go
        tabs, starts, rows = graphs.tables[:b], graphs.rows[0, :b], (graphs.rows[1, :b], graphs.rows[2, :b])
        cos, sin = graphs._rope(torch.full((3, b), ctx, device=self.dev))
        eps = layers[0].input_layernorm.eps
        a0 = layers[0].self_attn
        q = F.linear(h, a0.q_proj.weight)
        k = F.linear(h, a0.k_proj.weight)
        v = F.linear(h, a0.v_proj.weight)
        qo = qkv_post(q, k, v, a0, cos, sin, kvs[0], *rows)
        o = qo.view(b, -1)
        w, ids = fused_route(F.linear(h, layers[0].mlp.gate.weight), t.num_experts_per_tok, t.norm_topk_prob)
        kk, c = t.num_experts_per_tok, self.choices
        moe = c.moe_config(ids.numel())
        y = expert_pairs(h, ids, w, layers[0].mlp.experts.gate_up_proj, layers[0].mlp.experts.down_proj, None, moe)
        pieces = {
            "rmsnorm": lambda l, kv: rmsnorm(h, l.input_layernorm.weight, eps),
            "qkv_gemv": lambda l, kv: project("qkv", h, l.self_attn.q_proj.weight, l.self_attn.k_proj.weight,
                                              l.self_attn.v_proj.weight, choices=c),
            "qk_norm_rope_write": lambda l, kv: qkv_post(q, k, v, l.self_attn, cos, sin, kv, *rows),
            "attention": lambda l, kv: decode_attention(qo, kv[0], kv[1], tabs, starts, a0.scale),
            "o_gemv": lambda l, kv: project("o", o, l.self_attn.o_proj.weight, choices=c),
            "add_rmsnorm": lambda l, kv: rmsnorm(h, l.post_attention_layernorm.weight, eps, residual=h),
            "router": lambda l, kv: fused_route(project("router", h, l.mlp.gate.weight, choices=c)[0], kk,
                                                t.norm_topk_prob),
            # the fused alternatives (KernelChoices.norm_qkv_rows, norm_router_rows): not part of the sum below
            "qkv_gemv_with_norm": lambda l, kv: project(
                "qkv", h, l.self_attn.q_proj.weight, l.self_attn.k_proj.weight, l.self_attn.v_proj.weight,
                choices=c, norm=(l.input_layernorm.weight, eps)),
            "add_norm_router": lambda l, kv: norm_route(h, h, l.post_attention_layernorm.weight, eps,
                                                        l.mlp.gate.weight, kk, t.norm_topk_prob,
                                                        align_bm=moe.bm),
            "experts": lambda l, kv: expert_pairs(h, ids, w, l.mlp.experts.gate_up_proj, l.mlp.experts.down_proj,
                                                  None, moe),
            "sum_residual": lambda l, kv: sum_pairs(y, ids, t.num_experts, residual=h),
        }
        res = {}
        for name, fn in pieces.items():
            res[name] = 1e3 * self._graph_ms(lambda: [fn(l, kv) for l, kv in zip(layers, kvs)]) / self.n
        res["sum_of_pieces"] = sum(v for k, v in res.items() if k not in ("qkv_gemv_with_norm", "add_norm_router"))
        return res

    def _tune_gemv(self, b: int) -> dict:
        """cuBLAS (one launch per weight) vs the one-launch Triton GEMV for each decode projection at batch b, over
        all N layers in a CUDA graph; the faster goes into the choices (``KernelChoices.gemv``)."""
        from ..kernels.decode_layer import project

        t = self.cfg.text
        layers = [self.mid.model.language_model.layers[str(i)] for i in self.mid.layer_ids]
        x = torch.randn(b, t.hidden_size, device=self.dev, dtype=BF16)
        o = torch.randn(b, t.q_dim, device=self.dev, dtype=BF16)
        uses = {"qkv": (x, lambda l: (l.self_attn.q_proj.weight, l.self_attn.k_proj.weight,
                                      l.self_attn.v_proj.weight)),
                "o": (o, lambda l: (l.self_attn.o_proj.weight,)),
                "router": (x, lambda l: (l.mlp.gate.weight,))}
        # (the q/k/v stack's 9216 rows in 64-row tiles are 144 programs: 12 of the H100's / H200's 132 SMs get two,
        # so narrower tiles that spread the rows more evenly are tried too)
        tiles = {"qkv": [(32, 256), (16, 256), (64, 128), (16, 512), (32, 128), (16, 128)],
                 "o": [(16, 256), (32, 256), (16, 512), (32, 128), (16, 128)], "router": [(16, 256), (16, 512)]}
        res = {}
        for use, (inp, weights) in uses.items():
            times = {}
            for tile in [None] + tiles[use]:
                c = self.choices.with_gemv(use, tile)
                try:
                    times[str(tile)] = 1e3 * self._graph_ms(
                        lambda: [project(use, inp, *weights(l), choices=c) for l in layers]) / self.n
                except Exception as e:  # a tile this GPU rejects
                    times[str(tile)] = f"failed: {type(e).__name__}"
            best = min((tl_ for tl_ in [None] + tiles[use] if isinstance(times[str(tl_)], float)),
                       key=lambda tl_: times[str(tl_)])
            self.choose(self.choices.with_gemv(use, best))
            res[use] = {"us_per_layer": times, "chosen": str(best)}
        return res

    def _graph_ms(self, fn) -> float:
        fn()
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return cuda_time(g.replay, iters=20, reps=5)

    def _load(self, graphs: DecodeGraphs, tables: list[list[int]], b: int, ctx: int) -> None:
        t = self.cfg.text
        kw = {"input_ids": torch.randint(0, 150000, (b,))} if graphs.model.has_embed else \
            {"hidden": torch.randn(b, t.hidden_size, device=self.dev, dtype=BF16)}
        graphs.load(tables[:b], [ctx] * b, torch.full((3, b), ctx), **kw)

    def _unique_experts(self, graphs: DecodeGraphs, tables: list[list[int]], b: int, ctx: int) -> float:
        """Experts hit per layer in one eager step on random inputs (what the step must read)."""
        k = self.cfg.text.num_experts_per_tok
        counts: list[int] = []
        hook = lambda m, i, o: counts.append(int(torch.topk(o.float(), k).indices.unique().numel()))  # noqa: E731
        layers = graphs.model.model.language_model.layers.values()
        handles = [layer.mlp.gate.register_forward_hook(hook) for layer in layers]
        fused, graphs.fused = graphs.fused, False  # the module path calls the router module (hooks fire)
        try:
            self._load(graphs, tables, b, ctx)
            with torch.inference_mode(), module_layers(graphs.model):
                graphs.step(b)
        finally:
            graphs.fused = fused
            for h in handles:
                h.remove()
        return statistics.mean(counts)

    def _tune_moe(self):
        from .tune import tune

        t = self.cfg.text
        layer = self.mid.model.language_model.layers["0"]
        res = {}
        for b in self.batches:
            if b * t.num_experts_per_tok > self.choices.fused_max_pairs:
                continue
            x = torch.randn(b, t.hidden_size, device=self.dev, dtype=BF16)
            w, ids = route(layer.mlp.gate(x), t.num_experts_per_tok, t.norm_topk_prob)
            best, times = tune(x, ids, w, layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj)
            self.choose(self.choices.with_moe(None, ids.numel(), best))
            res[b] = {"best": repr(best), "times_ms": times}
        self.results["moe_tuning"] = res

    def _hf_decode_layers(self, b: int, ctx: int) -> float:
        """HF's decoder layers (+ final norm) for one decode step after a ctx-token prefill, median of 10 steps."""
        lm = self.hf.model.language_model
        h = self.cfg.text.hidden_size
        pkv = lm(inputs_embeds=0.02 * torch.randn(b, ctx, h, device=self.dev, dtype=BF16), use_cache=True
                 ).past_key_values
        x = 0.02 * torch.randn(b, 1, h, device=self.dev, dtype=BF16)
        step = lambda: lm(inputs_embeds=x, past_key_values=pkv, use_cache=True)  # noqa: E731
        # HF's first steps at a new shape are slow (seen at 5-10x the steady state): warm up well, report steady
        self.results.setdefault("hf_decode_warmup_ms", {})[b] = step_times(step, 20)
        return statistics.median(step_times(step, 10))

    def _full_decode(self, rows: dict, ctx: int) -> None:
        """Whole-model step (embedding + layers + final norm + lm_head), and the 94-layer extrapolation."""
        graphs, tables = self._decode_graphs(self.ours, self.opts.kv_block_size)
        graphs.capture()
        for b in self.batches:
            self._load(graphs, tables, b, ctx)
            ms = cuda_time(lambda: graphs.replay(b), iters=20, reps=5)
            r = rows[b]
            r["ours_full_step_ms"] = ms
            whole = self.full_layers * r["ours_ms_layer"] + (ms - r["ours_step_ms"])
            r["ours_whole_model_ms_extrapolated"] = whole
            r["ours_whole_model_tok_s_extrapolated"] = b / (whole * 1e-3)
            if self.hf is not None:
                # HF as a user calls it (whole model, embedding and lm_head included) -- its per-layer cost is
                # taken from this step (an upper bound, as in docs/benchmarks.md); calling HF's inner text model
                # directly measured 6-10x slower per step on the same shapes, so it is only kept in the JSON
                hf = self._hf_full_step(b, ctx)
                r.update(hf_full_step_ms=hf, hf_ms_layer=hf / self.n, speedup=hf / self.n / r["ours_ms_layer"],
                         full_step_speedup=hf / ms)

    def _hf_full_step(self, b: int, ctx: int) -> float:
        ids = torch.randint(0, 150000, (b, ctx), device=self.dev)
        pkv = self.hf(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
        nxt = torch.randint(0, 150000, (b, 1), device=self.dev)
        step = lambda: self.hf(input_ids=nxt, past_key_values=pkv, use_cache=True)  # noqa: E731
        step_times(step, 10)
        return statistics.median(step_times(step, 10))

    # -- prefill --------------------------------------------------------------------------------------------------
    def section_prefill(self):
        peak = self._ceilings()["matmul_tflops"]
        h = self.cfg.text.hidden_size
        lengths = list(self.opts.prefill)
        if self.opts.tune:
            self.results["prefill_moe_tuning"] = {n: self._tune_prefill_moe(n) for n in sorted(lengths)}
        self.results["prefill_attention"] = {n: self._prefill_attention_backends(n) for n in lengths}
        rows = {}
        for n in lengths:
            cache, tables = kv_cache(self.mid, 1, n, self.opts.kv_block_size, fill=False)
            x = 0.02 * torch.randn(n, h, device=self.dev, dtype=BF16)
            pos = torch.arange(n, device=self.dev).expand(3, n)
            layout = SeqLayout(tables, [0], [n])
            run = lambda: self.mid(positions=pos, layout=layout, cache=cache, hidden=x)  # noqa: E731
            # (several samples: single prefill samples moved by up to 8% between back-to-back runs)
            with module_layers(self.mid):  # the modules' layers around the fast attention and experts
                module_ms = cuda_time(run, iters=2, reps=7, warmup=2)
                module = run()
            ms = cuda_time(run, iters=2, reps=7, warmup=2)
            sdpa_ms = self._with_prompt_attention("sdpa", lambda: cuda_time(run, iters=2, reps=7, warmup=2))
            tf = self.n * prefill_layer_flops(self.cfg, n) / (ms * 1e-3) / 1e12
            r = {"ours_ms_layer": ms / self.n, "ours_tflops": tf, "ours_mfu": tf / peak,
                 "ours_module_path_ms_layer": module_ms / self.n, "ours_sdpa_attention_ms_layer": sdpa_ms / self.n,
                 "floor": prefill_layer_floor(self.cfg, n, self._ceilings()["copy_gbs"], peak)}
            r["ours_frac_of_floor"] = r["floor"]["floor_ms"] / r["ours_ms_layer"]
            r.update(self._quack_prefill(n, run, ms))
            if n == 2048:  # the fused path and the module path with fast impls against the reference impls
                fast = run()
                use_reference(self.mid)
                ref = run()
                enable_fast_paths(self.mid, choices=self.choices)
                r.update(rel_fused_vs_reference=rel(fast, ref), rel_module_fast_vs_reference=rel(module, ref))
            if self.hf is not None:
                lm = self.hf.model.language_model
                hf_ms = cuda_time(lambda: lm(inputs_embeds=x[None], use_cache=False), iters=2, reps=7, warmup=2)
                hf_tf = self.n * prefill_layer_flops(self.cfg, n) / (hf_ms * 1e-3) / 1e12
                r.update(hf_ms_layer=hf_ms / self.n, hf_tflops=hf_tf, hf_mfu=hf_tf / peak, speedup=hf_ms / ms)
            rows[n] = r
        self.results["prefill"] = rows

    def _quack_prefill(self, n: int, run, ms: float) -> dict:
        """quack's grouped GEMMs for the experts (kernels.cute, optional): one layer's experts call alone, the path
        the choices dispatch against quack with its default tile and with its own tuning, and the layers with quack
        on (``KernelChoices.quack_min_pairs``) against ``ms``, the same layers as dispatched; or why it cannot run."""
        from ..kernels.cute import quack_experts, unavailable
        from ..kernels.grouped import fast_experts

        why = unavailable("quack", self.dev)
        if why is not None:
            return {"quack": why}
        t = self.cfg.text
        layer = self.mid.model.language_model.layers["0"]
        gu, dn = layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj
        x = 0.02 * torch.randn(n, t.hidden_size, device=self.dev, dtype=BF16)
        w, ids = route(layer.mlp.gate(x), t.num_experts_per_tok, t.norm_topk_prob)
        ref = reference_experts(x, ids, w, gu, dn)
        call = {"dispatched": lambda: fast_experts(x, ids, w, gu, dn, choices=self.choices),
                "quack": lambda: quack_experts(x, ids, w, gu, dn),
                "quack_tuned": lambda: quack_experts(x, ids, w, gu, dn, tuned=True)}
        res = {}
        try:
            call["quack"]()  # compiles outside the timing
        except Exception as e:  # installed but not running here: say so
            return {"quack": f"failed: {type(e).__name__}: {str(e)[:160]}"}
        for name, fn in call.items():
            fn()  # compiles (and with tuned, times quack's configs) outside the timing
            res[f"experts_{name}_ms"] = cuda_time(fn, iters=2, reps=7, warmup=2)
            res[f"experts_{name}_rel_vs_reference"] = rel(fn(), ref)
        chosen = self.choices
        register(dataclasses.replace(chosen, quack_min_pairs=1))
        try:
            res["quack_ms_layer"] = cuda_time(run, iters=2, reps=7, warmup=2) / self.n
        finally:
            register(chosen)
        res["quack_layer_vs_dispatched"] = res["quack_ms_layer"] / (ms / self.n)
        return {"quack": res}

    def _with_prompt_attention(self, path: str, fn):
        """fn() with the fast paths' prompt attention (``KernelChoices.prompt_attention``) set to ``path``."""
        chosen = self.choices
        register(dataclasses.replace(chosen, prompt_attention=path))
        try:
            return fn()
        finally:
            register(chosen)

    def _tune_prefill_moe(self, n: int) -> dict:
        """Grouped GEMM vs the fused Triton kernel (prefill tiles) on one layer's experts for an n-token prompt;
        where Triton wins, the 'fast' experts impl uses it up to this size (``KernelChoices.fused_max_pairs``)."""
        from ..kernels import grouped
        from .tune import PREFILL_CANDIDATES, tune

        t = self.cfg.text
        layer = self.mid.model.language_model.layers["0"]
        gu, dn = layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj
        x = torch.randn(n, t.hidden_size, device=self.dev, dtype=BF16)
        w, ids = route(layer.mlp.gate(x), t.num_experts_per_tok, t.norm_topk_prob)
        grouped_ms = cuda_time(lambda: grouped.grouped_experts(x, ids, w, gu, dn), iters=2, reps=5)
        best, times = tune(x, ids, w, gu, dn, PREFILL_CANDIDATES, reps=5, calls=2)
        triton_ms = times.get(repr(best), float("inf"))
        c = self.choices.with_moe(None, ids.numel(), best)
        if triton_ms < grouped_ms:  # (lengths are tuned in increasing order)
            c = dataclasses.replace(c, fused_max_pairs=max(c.fused_max_pairs, ids.numel()))
        else:
            c = dataclasses.replace(c, fused_max_pairs=min(c.fused_max_pairs, ids.numel() - 1))
        self.choose(c)
        return {"grouped_ms": grouped_ms, "triton_best": repr(best), "triton_ms": times,
                "flops": 2.0 * n * t.num_experts_per_tok * 3 * t.hidden_size * t.moe_intermediate_size,
                "chosen": "triton" if triton_ms < grouped_ms else "grouped"}

    def _prefill_attention_backends(self, n: int) -> dict:
        """Causal GQA SDPA over an n-token prompt with each backend first (ms per call)."""
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        t = self.cfg.text
        q = torch.randn(1, t.num_attention_heads, n, t.head_dim, device=self.dev, dtype=BF16)
        k = torch.randn(1, t.num_key_value_heads, n, t.head_dim, device=self.dev, dtype=BF16)
        v = torch.randn_like(k)
        res = {}
        for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
            try:
                with sdpa_kernel([getattr(SDPBackend, name)]):
                    res[name] = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                 enable_gqa=True), iters=3, reps=3)
            except RuntimeError as e:  # this backend cannot run these inputs
                res[name] = f"unsupported: {str(e)[:120]}"
        from ..kernels.cute import unavailable

        res["FA4"] = unavailable("fa4", self.dev)
        if res["FA4"] is None:  # the same call through FlashAttention 4 (its [1, n, heads, D] layout)
            from flash_attn.cute import flash_attn_func

            qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))
            fa4 = lambda: flash_attn_func(qs, ks, vs, causal=True)  # noqa: E731
            try:
                fa4()  # (compiles on first use)
                res["FA4"] = cuda_time(fa4, iters=3, reps=3)
                ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                res["FA4_rel_vs_sdpa"] = rel(fa4()[0].transpose(1, 2), ref)
            except Exception as e:  # (a package that installed but does not run here: say so, time the rest)
                res["FA4"] = f"failed: {type(e).__name__}: {str(e)[:160]}"
        res.update(self._cache_attention_paths(n, fa4=isinstance(res["FA4"], float)))
        return res

    def _cache_attention_paths(self, n: int, fa4: bool = False) -> dict:
        """The two prompt paths over the KV cache (KernelChoices.prompt_attention), and the SDPA one through
        FlashAttention 4 where it runs (``prompt_fa4``), ms per call: a whole n-token prompt, and an n-row chunk
        continuing n cached tokens; and how far the Triton kernel and FA4 are from SDPA."""
        from ..kernels.attention import prefill_attention
        from ..kernels.extend_attention import extend_attention

        t = self.cfg.text
        cache, tables = kv_cache(self.mid, 1, 2 * n, self.opts.kv_block_size)
        k_cache, v_cache = cache.layer(0)
        q = torch.randn(n, t.num_attention_heads, t.head_dim, device=self.dev, dtype=BF16)
        scale = t.head_dim ** -0.5
        res = {}
        paths = [("triton_extend", extend_attention), ("sdpa", prefill_attention)]
        if fa4:
            paths.append(("fa4", functools.partial(prefill_attention, fa4=True)))
        for case, layout in (("prompt", SeqLayout(tables, [0], [n])), ("chunk", SeqLayout(tables, [n], [n]))):
            for name, fn in paths:
                res[f"{case}_{name}_ms"] = cuda_time(lambda: fn(q, k_cache, v_cache, layout, scale), iters=3, reps=3)
            res[f"{case}_rel_triton_vs_sdpa"] = rel(extend_attention(q, k_cache, v_cache, layout, scale),
                                                    prefill_attention(q, k_cache, v_cache, layout, scale))
            if len(paths) == 3:
                res[f"{case}_rel_fa4_vs_sdpa"] = rel(paths[2][1](q, k_cache, v_cache, layout, scale),
                                                     prefill_attention(q, k_cache, v_cache, layout, scale))
        return res

    # -- vision ---------------------------------------------------------------------------------------------------
    def section_vision(self):
        v = self.cfg.vision
        side = self.opts.image // v.patch_size
        grid = (1, side, side)
        pixels = torch.randn(side * side, v.patch_dim, device=self.dev, dtype=BF16)
        vis = self.ours.model.visual
        res = {"grid": list(grid), "backend_orders_ms": {}, "attention_only_ms": self._vision_attention_only(side)}
        self.ours.set_impl(vision_attention="fast")
        vis.runner = None  # eager first: the backend orders, then the reference
        names = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
        orders = {"default": None, **{f: (f, *(b for b in names if b != f)) for f in names[:2]}}
        from ..kernels.cute import unavailable

        res["fa4"] = unavailable("fa4", self.dev) or "runs"
        if res["fa4"] == "runs":  # FlashAttention 4 (kernels.cute): head_dim 72 in an 80-wide tile
            orders["FA4"] = ("FA4", *names)
        for label, order in orders.items():
            register(dataclasses.replace(self.choices, vision_backends=order))
            try:
                res["backend_orders_ms"][label] = cuda_time(lambda: vis(pixels, [grid]), iters=3, reps=5)
            except Exception as e:  # FA4 installed but not running here: say so, keep the SDPA orders
                if label != "FA4":
                    raise
                res["fa4"] = f"failed: {type(e).__name__}: {str(e)[:160]}"
        orders = {k: o for k, o in orders.items() if k in res["backend_orders_ms"]}
        best = min(res["backend_orders_ms"], key=res["backend_orders_ms"].get)
        self.choose(dataclasses.replace(self.choices, vision_backends=orders[best]))
        res["ours_fast_ms"] = res["backend_orders_ms"][best]
        res["fast_backend_first"] = best
        self.ours.set_impl(vision_attention="reference")
        res["ours_reference_ms"] = cuda_time(lambda: vis(pixels, [grid]), iters=3, reps=5)
        self.ours.set_impl(vision_attention="fast")
        eager_out = vis(pixels, [grid])[0]
        from ..runtime.vision_graph import GraphedVision

        res["ours_eager_fast_ms"] = res["ours_fast_ms"]
        vis.runner = GraphedVision(vis, fused_blocks=False)
        res["ours_graph_unfused_ms"] = cuda_time(lambda: vis(pixels, [grid]), iters=3, reps=5)
        vis.runner = GraphedVision(vis, buckets=True, exact_after=4)  # the patch-count bucket's graph
        res["ours_graph_bucket_ms"] = cuda_time(lambda: vis(pixels, [grid]), iters=3, reps=5)
        vis.runner = GraphedVision(vis)  # what serving uses by default: one unpadded graph per shape
        res["ours_graph_ms"] = cuda_time(lambda: vis(pixels, [grid]), iters=3, reps=5)
        res["rel_graph_vs_eager"] = rel(vis(pixels, [grid])[0], eager_out)
        if torch.cuda.get_device_capability(self.dev) >= (8, 9):  # (fp8 tensor cores)
            res.update(self._vision_fp8(vis, pixels, grid, eager_out))
        res["ours_fast_ms"] = min(res["ours_fast_ms"], res["ours_graph_ms"])
        res["ours_tflops"] = vision_flops(self.cfg, side * side) / (res["ours_fast_ms"] * 1e-3) / 1e12
        if self.hf is not None:
            thw = torch.tensor([grid], device=self.dev)
            res["hf_ms"] = cuda_time(lambda: self.hf.model.visual(pixels, grid_thw=thw), iters=3, reps=5)
            hf_out = self.hf.model.visual(pixels, grid_thw=thw).pooler_output
            res["rel_fast_vs_hf"] = rel(vis(pixels, [grid])[0], hf_out)
            res["speedup"] = res["hf_ms"] / res["ours_fast_ms"]
        self.results["vision"] = res

    def _vision_fp8(self, vis, pixels: torch.Tensor, grid: tuple, bf16_out: torch.Tensor) -> dict:
        """``--vision-fp8``: a copy of the tower with its block linears in fp8 (model.quant.Fp8Linear) on the fast
        path, from its exact graph as serving runs it and eagerly, and how far its merged tokens are from the bf16
        tower's."""
        from ..model.quant import Fp8Linear
        from ..runtime.vision_graph import GraphedVision

        runner, vis.runner = vis.runner, None  # (the graphs are not copied)
        try:
            f8 = copy.deepcopy(vis)
        finally:
            vis.runner = runner
        f8.quantize_linears_fp8()
        for m in f8.modules():
            if isinstance(m, Fp8Linear):
                m.impl = "fast"
        res = {"fp8_linears_eager_ms": cuda_time(lambda: f8(pixels, [grid]), iters=3, reps=5)}
        f8.runner = GraphedVision(f8)
        res["fp8_linears_graph_ms"] = cuda_time(lambda: f8(pixels, [grid]), iters=3, reps=5)
        res["rel_fp8_linears_vs_bf16"] = rel(f8(pixels, [grid])[0], bf16_out)
        return res  # (the copy and its graphs go with this frame)

    def _vision_attention_only(self, side: int) -> dict:
        """One image's attention (all heads, one segment) with each SDPA backend forced, ms per call."""
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        v = self.cfg.vision
        q, k, w = (torch.randn(1, v.num_heads, side * side, v.head_dim, device=self.dev, dtype=BF16) for _ in range(3))
        res = {}
        for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
            try:
                with sdpa_kernel([getattr(SDPBackend, name)]):
                    res[name] = cuda_time(lambda: F.scaled_dot_product_attention(q, k, w), iters=3, reps=3)
            except RuntimeError as e:
                res[name] = f"unsupported: {str(e)[:120]}"
        from ..kernels.cute import fa4_segment_attention, unavailable

        if unavailable("fa4", self.dev) is None:  # the same call through FlashAttention 4, [N, heads, d] views
            qs, ks, ws = (t[0].transpose(0, 1) for t in (q, k, w))
            fa4 = lambda: fa4_segment_attention(qs, ks, ws, [0, side * side], v.head_dim**-0.5)  # noqa: E731
            try:
                fa4()  # (compiles on first use)
            except Exception as e:  # installed but not running here: say so
                res["FA4"] = f"failed: {type(e).__name__}: {str(e)[:160]}"
                return res
            res["FA4"] = cuda_time(fa4, iters=3, reps=3)
            with sdpa_kernel([SDPBackend.MATH]):
                exact = F.scaled_dot_product_attention(q.float(), k.float(), w.float())[0].transpose(0, 1)
            res["FA4_rel_vs_fp32"] = rel(fa4(), exact)
            res["two_segments_FA4_rel_vs_fp32"] = rel(
                fa4_segment_attention(qs, ks, ws, [0, 1000, side * side], v.head_dim**-0.5),
                torch.cat([F.scaled_dot_product_attention(*(t.float().transpose(0, 1)[:, a:b] for t in (qs, ks, ws)))
                           .transpose(0, 1) for a, b in ((0, 1000), (1000, side * side))]))
        return res

    # -- fp8-resident experts --------------------------------------------------------------------------------------
    def section_fp8(self):
        """The middle stage's layers with their experts quantised to fp8 in the releases' 128x128 blocks (kept fp8,
        ``Experts.quantize_fp8``) against a twin holding those same weights dequantised to bf16: outputs
        compared bit for bit (the fp8 kernels compute with the dequantised weights), then decode and prefill
        timed on the fp8 layers, as they are and W8A8 (their inputs quantised too); then one experts call alone at
        each prefill length, bf16 / fp8 / W8A8 with and without its quantisation fused (bench/experts_ab.py)."""
        block, n = (128, 128), self.n
        stage = dict(layers=(0, n), vision=False, embed=False, head=False)
        fp8 = ours_from(self.cfg, self.mid.state_dict(), **stage)
        deq = ours_from(self.cfg, self.mid.state_dict(), **stage)
        for a, b in zip(fp8.model.language_model.layers.values(), deq.model.language_model.layers.values()):
            a.mlp.experts.quantize_fp8(block)
            e = a.mlp.experts
            pairs = [e.scales.dequantize(i, e.gate_up_proj, e.down_proj, BF16) for i in range(e.gate_up_proj.shape[0])]
            b.mlp.experts.gate_up_proj = torch.nn.Parameter(torch.stack([p[0] for p in pairs]), requires_grad=False)
            b.mlp.experts.down_proj = torch.nn.Parameter(torch.stack([p[1] for p in pairs]), requires_grad=False)
            del pairs
        enable_fast_paths(fp8, choices=self.choices)
        enable_fast_paths(deq, choices=self.choices)
        res: dict = {"block": list(block)}
        h = self.cfg.text.hidden_size
        # exactness: decode-sized rows (1, 8) and a 2048-token prompt; the tile shapes are the same on both sides
        # unless this process re-tuned one table and not the other
        for rows in (1, 8, 2048):
            x = 0.02 * torch.randn(rows, h, device=self.dev, dtype=BF16)
            outs = [self._stage_prompt(m, x) for m in (fp8, deq)]
            res[f"equal_{rows}_rows"] = bool(torch.equal(*outs))
            res[f"rel_{rows}_rows"] = rel(*outs)
            res[f"experts_{rows}_rows"] = self._fp8_experts_call(fp8, deq, x)
        del deq
        torch.cuda.empty_cache()
        res["act_quant"] = self._act_quant_check()
        res.update(self._fp8_timings(fp8, block))
        # W8A8: the same fp8 weights, the experts' inputs quantised per token and 128 columns too
        for layer in fp8.model.language_model.layers.values():
            layer.mlp.experts.fp8_act_quant = True
        res["w8a8"] = self._fp8_timings(fp8, block)
        from .experts_ab import experts_ab

        res["call_ab"] = experts_ab(self.mid, fp8, self.choices, list(self.opts.prefill))
        self.results["fp8"] = res

    def _stage_prompt(self, model, x: torch.Tensor) -> torch.Tensor:
        """``model`` (a layers-only stage) on one prompt of x's rows [T, H], in a fresh cache."""
        rows = x.shape[0]
        cache, tables = kv_cache(model, 1, rows, self.opts.kv_block_size, fill=False)
        pos = torch.arange(rows, device=self.dev).expand(3, rows)
        return model(positions=pos, layout=SeqLayout(tables, [0], [rows]), cache=cache, hidden=x)

    def _act_quant_check(self) -> dict:
        """The W8A8 input quantisation kernel against model.quant.quantize_activations on this GPU (bit for bit)."""
        from ..model.quant import quantize_activations
        from ..kernels.moe_triton import act_quant

        x = torch.randn(1000, self.cfg.text.hidden_size, device=self.dev, dtype=BF16) * 3
        (q, s), (q_ref, s_ref) = act_quant(x, 128), quantize_activations(x, 128)
        return {"scales_equal": bool(torch.equal(s, s_ref)),
                "values_equal_frac": (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item()}

    def _fp8_timings(self, fp8, block) -> dict:
        """Tuning (unless --no-tune), decode graphs per batch and prefill, on the fp8 layers as they are set."""
        res: dict = {}
        n, h, ctx = self.n, self.cfg.text.hidden_size, self.opts.context
        if self.opts.tune:  # installs the best tiles for the fp8 steps timed below
            res["moe_tuning"] = self._tune_moe_fp8(fp8)
        graphs, tables = self._decode_graphs(fp8, self.opts.kv_block_size)
        unique = {b: self._unique_experts(graphs, tables, b, ctx) for b in self.batches}
        graphs.capture()
        per_weight = 1.0 + 4.0 / (block[0] * block[1])  # fp8 byte + its share of the fp32 scale
        decode = {}
        for b in self.batches:
            self._load(graphs, tables, b, ctx)
            ms = cuda_time(lambda: graphs.replay(b), iters=20, reps=5)
            by = decode_layer_bytes(self.cfg, unique[b], b, ctx, expert_bytes=per_weight)
            decode[b] = {"ms_layer": ms / n, "unique_experts": unique[b], "bytes_layer": by,
                         "gbs": by / (ms / n * 1e-3) / 1e9,
                         "frac_copy_bw": by / (ms / n * 1e-3) / 1e9 / self._ceilings()["copy_gbs"]}
            if b in self.results.get("decode", {}):
                decode[b]["bf16_ms_layer"] = self.results["decode"][b]["ours_ms_layer"]
        res["decode"] = decode
        graphs = None
        torch.cuda.empty_cache()
        prefill = {}
        peak = self._ceilings()["matmul_tflops"]
        for t in list(self.opts.prefill):
            cache, tables = kv_cache(fp8, 1, t, self.opts.kv_block_size, fill=False)
            x = 0.02 * torch.randn(t, h, device=self.dev, dtype=BF16)
            pos = torch.arange(t, device=self.dev).expand(3, t)
            layout = SeqLayout(tables, [0], [t])
            run = lambda: fp8(positions=pos, layout=layout, cache=cache, hidden=x)  # noqa: E731
            ms = cuda_time(run, iters=2, reps=7, warmup=2)
            tf = n * prefill_layer_flops(self.cfg, t) / (ms * 1e-3) / 1e12
            prefill[t] = {"ms_layer": ms / n, "tflops": tf, "mfu": tf / peak,
                          "bf16_ms_layer": self.results.get("prefill", {}).get(t, {}).get("ours_ms_layer")}
        res["prefill"] = prefill
        return res

    def _fp8_experts_call(self, fp8, deq, x: torch.Tensor) -> dict:
        """One experts call of layer 0 on fp8 weights and on their bf16 dequantisation, each against float32
        products of the dequantised weights: the two kernels' distance from exact, and how often they agree."""
        from ..kernels.moe_triton import fused_experts

        t = self.cfg.text
        a, b = fp8.model.language_model.layers["0"].mlp, deq.model.language_model.layers["0"].mlp
        w, ids = route(a.gate(x), t.num_experts_per_tok, t.norm_topk_prob)
        gq, dq, scales = a.experts.gate_up_proj, a.experts.down_proj, a.experts.scales
        y8 = fused_experts(x, ids, w, gq, dq, scales)
        y16 = fused_experts(x, ids, w, b.experts.gate_up_proj, b.experts.down_proj)
        ref = reference_experts(x.float(), ids, w.float(), b.experts.gate_up_proj.float(),
                                b.experts.down_proj.float())
        w8a8 = scales._replace(act_quant=True)
        y88 = fused_experts(x, ids, w, gq, dq, w8a8)
        return {"rel_fp8_vs_fp32": rel(y8, ref), "rel_bf16_vs_fp32": rel(y16, ref), "rel_fp8_vs_bf16": rel(y8, y16),
                "equal_frac": (y8 == y16).float().mean().item(), "rel_w8a8_vs_fp32": rel(y88, ref),
                "rel_w8a8_vs_w8a8_reference": rel(y88, reference_experts(x, ids, w, gq, dq, w8a8))}

    def _tune_moe_fp8(self, model) -> dict:
        """The expert tiles timed on fp8 experts (reduction tiles narrowed to the block width), at the decode
        batches and the prefill lengths; the fastest go into the choices' fp8 (or W8A8) tile table for the timings
        after."""
        from .tune import FP8_CANDIDATES, FP8_PREFILL_CANDIDATES, W8A8_CANDIDATES, W8A8_PREFILL_CANDIDATES, tune

        t = self.cfg.text
        layer = model.model.language_model.layers["0"]
        e = layer.mlp.experts
        res = {}
        prefill = list(self.opts.prefill)
        decode_cands, prefill_cands = ((W8A8_CANDIDATES, W8A8_PREFILL_CANDIDATES) if e.scales.act_quant
                                       else (FP8_CANDIDATES, FP8_PREFILL_CANDIDATES))
        for rows in self.batches + prefill:
            x = torch.randn(rows, t.hidden_size, device=self.dev, dtype=BF16)
            w, ids = route(layer.mlp.gate(x), t.num_experts_per_tok, t.norm_topk_prob)
            decode = rows in self.batches
            best, times = tune(x, ids, w, e.gate_up_proj, e.down_proj, scales=e.scales,
                               candidates=decode_cands if decode else prefill_cands,
                               **({} if decode else {"reps": 5, "calls": 2}))
            self.choose(self.choices.with_moe(e.scales, ids.numel(), best))
            res[rows] = {"best": repr(best), "times_ms": times}
        return res

    # -- tensor parallel -------------------------------------------------------------------------------------------
    def section_tp(self):
        """One tensor rank's shard of the real layers at each N, collectives left out (bench/tp.py)."""
        from .tp import section

        self.results["tp"] = section(self)

    # -- report ---------------------------------------------------------------------------------------------------
    def table(self) -> str:
        from .report import render

        return render(self.results)
