"""What a grammar costs a decode step: the same engine (a preset's dimensions, ``layers`` decoder layers, random
weights, CUDA-graph decode on a GPU) decoding B sequences with and without a JSON-schema grammar each.

Per batch size B it times engine steps in steady decode (after warm-up) and reports the mean step with and without
grammars, their difference, and the part of it spent filling the masks on the CPU (the rest is the mask's copy to
the device and its application to the logits). The tokenizer is the synthetic Qwen-shaped one (``qwen-vl synth``):
the vocabulary's size and byte-level shape are the release's, which is what a mask's cost depends on.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

from ..checkpoint.synth_processor import write_processor_files
from ..engine.build import RunOptions, build_runtime, make_plan, new_engine, open_source
from ..engine.engine import Engine, Prompt
from ..engine.grammar import GrammarBackend, json_format, structural_tag
from ..engine.sampler import SequenceSampler
from ..engine.sampling import SamplingParams
from ..pipeline.executor import LocalExecutor

IM_END = 151645
# A free-text field: random weights almost never draw one of the few tokens that close it, so every step of the
# measured window is inside the grammar. (A length-bounded string would measure xgrammar's repetition counts, which
# cost far more per token for long bounds: ~60 ms a mask at minLength 4000.)
SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


class _TimedSampler(SequenceSampler):
    """Adds up the time spent filling the grammars' masks (CPU)."""

    fill_s = 0.0

    def _masks(self, states, device):
        t0 = time.perf_counter()
        out = super()._masks(states, device)
        self.fill_s += time.perf_counter() - t0
        return out


def mask_cost(preset: str, layers: int, batches: list[int], steps: int, device: str, dtype: str) -> list[dict]:
    tok_dir = tempfile.mkdtemp(prefix="qwen-vl-tokenizer-")
    write_processor_files(tok_dir)
    opts = RunOptions(model="", device=device, dtype=dtype, max_batch=max(batches), max_len=steps + 64,
                      random_preset=preset, random_layers=layers, quiet=True)
    ckpt = open_source(opts)
    plan = make_plan(ckpt.cfg, opts)
    runtime = build_runtime(ckpt, plan, 0, _device(device), opts)
    sampler = _TimedSampler(GrammarBackend(tok_dir, ckpt.cfg.text.vocab_size, [IM_END]))
    runtime.sampler = sampler
    rows = []
    for b in batches:
        for grammar in (None, structural_tag(json_format(SCHEMA))):
            engine = new_engine(ckpt.cfg, LocalExecutor(runtime), plan, opts, [IM_END])
            ms, fill_ms = _decode_ms(engine, sampler, b, steps, grammar)
            rows.append({"batch": b, "grammar": grammar is not None, "step_ms": ms, "mask_fill_ms": fill_ms})
    return rows


def _device(name: str):
    import torch

    return torch.device("cuda", 0) if name == "cuda" else torch.device("cpu")


def _decode_ms(engine: Engine, sampler: _TimedSampler, b: int, steps: int, grammar: str | None):
    params = SamplingParams(temperature=1.0, seed=0, max_new_tokens=steps + 16, grammar=grammar)
    seqs = [engine.add(Prompt([100 + i, 200, 300, 400]), dataclasses.replace(params, seed=i)) for i in range(b)]
    while any(len(s.output) < 8 for s in seqs):  # prefill, the grammars compiled, graphs warm
        engine.step()
    sampler.fill_s = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - t0
    for s in seqs:
        engine.abort(s)
    engine.run_until_done()
    return round(elapsed * 1000 / steps, 4), round(sampler.fill_s * 1000 / steps, 4)
