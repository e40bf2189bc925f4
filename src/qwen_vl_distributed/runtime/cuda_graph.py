"""CUDA-graph replay of one stage's decode step, one graph per batch-size bucket, over the KV cache's blocks.

Shapes: B sequences decoding one token each, Bb the bucket (smallest captured size >= B), H hidden, V vocab,
W the widest block table (the cache's ``max_blocks_per_seq``).

A decode step is ~100 small kernels per layer: launched from Python they cost more host time than the GPU needs
(see docs/benchmarks.md), so the step is captured once per bucket and replayed. What the graph reads lives in
static buffers: input_ids or hidden, positions [3, Bb], block tables [Bb, W], and per row its start and the block
and offset its new k/v go to [Bb] (worked out on the host when the step is loaded). Rows B..Bb-1 are padding: they
decode token 0 at position 0 into the cache's scratch block, which no sequence owns, so they never touch real
blocks. Table entries past a sequence's length keep whatever an earlier step left: no kernel reads them.

The captured step is the text-only decode path of ``Qwen3VLMoe.forward`` (embedding or incoming hidden, the
stage's layers, final norm + lm_head) written without host work: rotary tables from device-resident index tables,
the layout's device tensors pre-filled with the static buffers, and every row's logits (all rows are last rows).
Implementations behind the kernel interfaces must be graph-safe (``kernels.decode_graph_safe``): 'fast' (Triton
experts at decode sizes, split-KV attention), not 'reference' (host loops over python lists) or grouped GEMM. A
step whose implementations are not is never captured: it runs eagerly. The captured step's layout refuses to be
read on the host (``CapturedLayout``), so a path that would freeze the capture-time block tables and lengths
into the graph fails the capture with an error instead of replaying them.
"""

from __future__ import annotations

import torch

from ..model.batch import SeqLayout, to_device
from ..model.kv_cache import KVCache
from ..model.qwen3_vl import Qwen3VLMoe
from ..model.rope import mrope_axis_tensor, text_inv_freq
from ..kernels import decode_graph_safe, fused_layers_fit, module_layers
from ..kernels.choices import DEFAULT, KernelChoices

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)


class CapturedLayout(SeqLayout):
    """The layout of a decode step as a CUDA graph captures it: its device tensors (starts, block tables, the rows'
    blocks and offsets: ``bind``) are the graph's static buffers; reading the step on the host (row offsets,
    tables built from the host lists) raises, since a graph would replay the capture-time values for every later
    step."""

    def offsets(self) -> list[int]:
        raise _host_read("the packed rows' offsets")

    def tensor(self, name: str, device) -> torch.Tensor:
        return self._bound((name, str(device)), f"a device copy of {name!r}")

    def block_table(self, device) -> torch.Tensor:
        return self._bound(("tables", str(device)), "the block tables")

    def row_tables(self, device, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._bound(("rows", str(device), block_size), "per-row cache tables")

    def _bound(self, key: tuple, what: str):
        if key not in self._cache:
            raise _host_read(what)
        return self._cache[key]


def _host_read(what: str) -> RuntimeError:
    return RuntimeError(f"CUDA-graph capture of a decode step: an implementation read {what} from the step's host "
                        "lists, which the graph would freeze at their capture-time values; select graph-safe "
                        "implementations (kernels.decode_graph_safe) or leave this stage uncaptured")


class DecodeGraphs:
    def __init__(self, model: Qwen3VLMoe, cache: KVCache, buckets: tuple[int, ...] = DEFAULT_BUCKETS,
                 fused: bool | None = None, choices: KernelChoices = DEFAULT):
        """``fused``: run each layer through kernels.decode_layer (16 launches) rather than the module's eager
        forward; default: where ``kernels.fused_layers_fit``. Steps are captured only where the fused layers or the
        modules' implementations are graph-safe (``capturable``). ``choices``: the fused layers' tiles
        (kernels.choices)."""
        self.model = model
        self.choices = choices
        self.cache = cache
        self.scratch = cache.scratch_block
        self.buckets = tuple(sorted(set(buckets)))
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.fused = fused_layers_fit(model) if fused is None else fused
        self.capturable = self.fused or decode_graph_safe(model)
        t = model.cfg.text
        n = self.buckets[-1]
        dev = self.device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.hidden = torch.zeros(n, t.hidden_size, dtype=self.dtype, device=dev)
        self.positions = torch.zeros(3, n, dtype=torch.long, device=dev)
        self.tables = torch.full((n, cache.max_blocks_per_seq), self.scratch, dtype=torch.int32, device=dev)
        # per row: start (tokens cached before it), block and offset its k/v go to; until a step is loaded (the
        # capture's warm-up runs) every row writes the scratch block, never a block a sequence may hold
        self.rows = torch.zeros(3, n, dtype=torch.long, device=dev)
        self.rows[1].fill_(self.scratch)
        # rotary tables made once: the shared device axis map, and the inverse frequencies (text_rope_tables makes
        # those per call: a few kernels that a captured decode step need not replay)
        self._axis = mrope_axis_tensor(t.head_dim // 2, tuple(t.mrope_section), str(dev))
        self._inv = text_inv_freq(t.head_dim, t.rope_theta, dev)
        self._host = SeqLayout([], [], [])  # the last loaded step, padded to its bucket
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    # -- the step ----------------------------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same arithmetic as model.rope.text_rope_tables, on precomputed device tables."""
        freqs = positions.float()[self._axis].transpose(0, 1) * self._inv  # [B, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _layout(self, b: int, captured: bool = False) -> SeqLayout:
        # The python lists are the last loaded step's (eager paths read them); captured kernels read only the
        # device tensors, which are the static buffers themselves.
        h = self._host
        tables = (h.block_tables + [[self.scratch]] * b)[:b]
        starts = (h.starts + [0] * b)[:b]
        return (CapturedLayout if captured else SeqLayout)(tables, starts, [1] * b).bind(
            self.device, self.cache.block_size, starts=self.rows[0, :b], block_table=self.tables[:b],
            rows=(self.rows[1, :b], self.rows[2, :b]))

    def step(self, b: int, captured: bool = False) -> torch.Tensor:
        """The decode step on the first b rows of the static buffers: eager, or (``captured``) as a graph captures
        it, with a layout that refuses host reads."""
        m = self.model
        lm = m.model.language_model
        h = lm.embed_tokens(self.input_ids[:b]) if m.has_embed else self.hidden[:b]
        rope = self._rope(self.positions[:, :b])
        if self.fused:
            from ..kernels.decode_layer import decode_layer, rmsnorm

            rows = (self.rows[1, :b], self.rows[2, :b])
            for idx in m.layer_ids:
                h = decode_layer(lm.layers[str(idx)], h, *rope, self.cache.layer(idx), self.tables[:b],
                                 self.rows[0, :b], rows, self.choices)
            if not m.has_head:
                return h
            return m.lm_head(rmsnorm(h, lm.norm.weight, lm.norm.eps)).float()
        layout = self._layout(b, captured)
        with module_layers(m):  # not fused: the modules' own forward, whatever layer impl the model selects
            for idx in m.layer_ids:
                h = lm.layers[str(idx)](h, rope, self.cache.layer(idx), layout)
        if not m.has_head:
            return h
        return m.lm_head(lm.norm(h)).float()

    # -- capture and replay ------------------------------------------------------------------------------------
    def capture(self, warmup: int = 2) -> None:
        """Capture every bucket (largest first, sharing one memory pool). Kernels compile in the warm-up runs, which
        take the captured step's path (so a host read fails here, before any capture)."""
        if self.device.type != "cuda" or not self.capturable:
            return  # CPU, or implementations a graph cannot hold: ``run`` executes the eager step
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode():
            for b in reversed(self.buckets):
                with torch.cuda.stream(side):
                    for _ in range(warmup):
                        self.step(b, captured=True)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[b] = self.step(b, captured=True)
                self.graphs[b] = graph
        torch.cuda.synchronize(self.device)

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"decode batch {n} is larger than the largest captured bucket {self.buckets[-1]}")

    def load(self, tables: list[list[int]], starts: list[int], positions: torch.Tensor,
             input_ids: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> int:
        """Copy one step's inputs into the static buffers, padding to the bucket; returns the bucket. The host
        lists go over in one pinned copy, queued without a stream sync: per row its start, the block and offset its
        k/v go to, and its block table, zero-padded."""
        n = len(starts)
        b = self.bucket(n)
        bs = self.cache.block_size
        pad = b - n
        self._host = SeqLayout(list(tables) + [[self.scratch]] * pad, list(starts) + [0] * pad, [1] * b)
        width = max(len(t) for t in self._host.block_tables)
        if width > self.tables.shape[1]:
            raise ValueError(f"a block table of {width} blocks is wider than the cache's {self.tables.shape[1]}")
        packed = to_device(torch.tensor([[s, t[s // bs], s % bs] + t + [0] * (width - len(t))
                                         for s, t in zip(self._host.starts, self._host.block_tables)]), self.device)
        self.rows[:, :b].copy_(packed[:, :3].T)
        self.tables[:b, :width].copy_(packed[:, 3:])
        self.positions[:, :n].copy_(positions, non_blocking=True)
        self.positions[:, n:b].zero_()
        if self.model.has_embed:
            self.input_ids[:n].copy_(input_ids, non_blocking=True)
            self.input_ids[n:b].zero_()
        else:
            self.hidden[:n].copy_(hidden, non_blocking=True)
            self.hidden[n:b].zero_()
        return b

    def replay(self, b: int) -> torch.Tensor:
        if b in self.graphs:
            self.graphs[b].replay()
            return self.outputs[b]
        with torch.inference_mode():
            return self.step(b)

    def run(self, *, positions: torch.Tensor, layout: SeqLayout, input_ids: torch.Tensor | None = None,
            hidden: torch.Tensor | None = None) -> torch.Tensor:
        """A decode step, as ``Qwen3VLMoe.forward`` would return it for this layout (rows [:B] of the bucket).

        The returned tensor is the graph's output buffer: read or copy it before the next replay."""
        if not layout.is_decode:
            raise ValueError("DecodeGraphs runs decode steps only (every sequence brings one token)")
        b = self.load(layout.block_tables, layout.starts, positions, input_ids, hidden)
        return self.replay(b)[:len(layout.starts)]


class GraphedStage:
    """Drop-in for a stage model's forward: decode steps that fit a bucket replay a graph; every other step runs
    the model's own forward (with ``enable_fast_paths``, its layers run the 'fused' layer impl)."""

    def __init__(self, model: Qwen3VLMoe, cache: KVCache, buckets: tuple[int, ...] = DEFAULT_BUCKETS,
                 fused: bool | None = None, choices: KernelChoices = DEFAULT):
        self.model = model
        self.graphs = DecodeGraphs(model, cache, buckets, fused, choices)
        self.graphs.capture()

    def __getattr__(self, name):  # has_head, has_embed, layer_ids, ... come from the model
        return getattr(self.model, name)

    def __call__(self, *, positions, layout, cache, input_ids=None, hidden=None, visual=None, logits_rows=None):
        if (cache is self.graphs.cache and layout.is_decode and visual is None and logits_rows is None
                and len(layout.starts) <= self.graphs.buckets[-1]):
            return self.graphs.run(positions=positions, layout=layout, input_ids=input_ids, hidden=hidden)
        with torch.inference_mode():
            return self.model(positions=positions, layout=layout, cache=cache, input_ids=input_ids, hidden=hidden,
                              visual=visual, logits_rows=logits_rows)
