"""The process grid (S stages x N tensor ranks, one process each, gloo on CPU) equals one process, token for token,
on a checkpoint written by transformers' own save_pretrained.

The model's shapes let N = 2 and 3 split it: 6 query heads over 1 kv head (replicated on every tensor rank: the
235B's 4 kv heads over 8 ranks are the same case), 6 experts of width 12 (split by expert or by width). Each case
starts its grid once and runs a mix of requests at once: text, two images, a video, greedy, seeded and penalised
sampling, prompts of several lengths. (Split kv heads, every expert layout and fp8: tests/test_tensor_parallel.py.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time

import pytest

from hf_oracle import hf_model
from mm_inputs import chat, image_tokens, pixels, video_tokens
from procs import CLI, alive, children, cmdline, kill_tree, wait_for_output
from qwen_vl_distributed.checkpoint.synth_processor import write_processor_files
from qwen_vl_distributed.checkpoint.synth_weights import GENERATION_CONFIG
from qwen_vl_distributed.engine.build import RunOptions, start_engine
from qwen_vl_distributed.engine.engine import Prompt
from qwen_vl_distributed.engine.sampling import SamplingParams
from qwen_vl_distributed.model.config import preset

PATCH = 1536


def grid_cfg():
    cfg = preset("tiny")
    text = dataclasses.replace(cfg.text, hidden_size=48, num_attention_heads=6, num_key_value_heads=1,
                               num_experts=6, num_experts_per_tok=2, moe_intermediate_size=12, num_hidden_layers=4)
    return dataclasses.replace(cfg, text=text, vision=dataclasses.replace(cfg.vision, out_hidden_size=48))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """HF's model (random weights) as its save_pretrained writes it, with the tokenizer and processor files."""
    d = tmp_path_factory.mktemp("hf-grid")
    hf_model(grid_cfg(), seed=3).save_pretrained(d)  # config.json as transformers writes it (num_local_experts)
    (d / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))  # HF's has no stop tokens
    write_processor_files(d)
    return str(d)


def _requests():
    imgs = [(1, 4, 4), (1, 6, 10)]
    toks = [100] + image_tokens(4, 4) + [200] + image_tokens(6, 10) + [300]
    return [
        Prompt(chat([100, 2000, 30000, 400, 5])),
        Prompt(chat(toks), None, pixels(16 + 60, PATCH, 1), imgs),
        Prompt(chat(video_tokens(2, 4, 6) + [7]), None, None, None, pixels(48, PATCH, 2), [(2, 4, 6)]),
        Prompt(chat([9] * 40)),
    ]


def _run(model_dir: str, stages: int, tp: int, moe: str = "auto", new_tokens: int = 8, **kw) -> list[list[int]]:
    """The requests' output tokens; ``_run.last``: the engine's KV-cache stats after them."""
    opts = RunOptions(model=model_dir, stages=stages, tensor_parallel=tp, moe_parallel=moe, max_batch=4, max_len=192,
                      quiet=True, stage_timeout_s=60, **kw)
    handle = start_engine(opts)
    try:
        greedy = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
        seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_new_tokens=new_tokens)
        penalized = SamplingParams(temperature=0.0, repetition_penalty=2.0, max_new_tokens=new_tokens)
        params = [greedy, seeded, penalized, greedy]
        seqs = [handle.engine.add(p, params[i]) for i, p in enumerate(_requests())]
        handle.engine.run_until_done()
        assert [s["stage"] for s in handle.engine.executor.stage_stats()] == list(range(stages))
        _run.last = handle.engine.cache_stats()
        return [s.output for s in seqs]
    finally:
        handle.close()


@pytest.fixture(scope="module")
def single(hf_dir):
    return _run(hf_dir, 1, 1)


@pytest.mark.parametrize("stages,tp,moe", [(1, 2, "tp"), (1, 3, "ep"), (2, 1, "auto"), (2, 2, "ep"), (2, 3, "tp")])
def test_grid_equals_single_process(hf_dir, single, stages, tp, moe):
    assert _run(hf_dir, stages, tp, moe) == single


@pytest.fixture(scope="module")
def single_long(hf_dir):
    return _run(hf_dir, 1, 1, new_tokens=40)


@pytest.mark.parametrize("stages,tp,moe", [(1, 2, "tp"), (2, 2, "ep")])
def test_grid_under_kv_pressure_preempts_and_equals_single_process(hf_dir, single_long, stages, tp, moe):
    """Every tensor rank holds the pool's blocks for its kv heads, the leader's block tables reach them with each
    step: a pool of 96 tokens in blocks of 4, for requests that grow to ~300 together, preempts some, and every one
    ends with the tokens of one process without pressure."""
    assert _run(hf_dir, stages, tp, moe, new_tokens=40, max_total_tokens=96, kv_block_size=4) == single_long
    stats = _run.last
    assert stats.blocks == 24 and stats.preemptions > 0 and stats.blocks_used == 0


def test_a_grid_the_model_cannot_split_is_refused_before_any_process_starts(hf_dir):
    r = subprocess.run([*CLI, "generate", "--model", hf_dir, "--prompt", "hi", "--tp", "4", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("error: --tensor-parallel-size 4: the model's 6 attention heads do "
                                                 "not split into 4 equal parts (text_config.num_attention_heads)")


def test_the_grid_is_part_of_the_plan_fingerprint():
    from qwen_vl_distributed.pipeline.plan import plan_stages

    cfg = grid_cfg()
    one, two = plan_stages(cfg, 2, require_fit=False), plan_stages(cfg, 2, require_fit=False, tp=2)
    assert one.layer_ranges == two.layer_ranges and one.fingerprint() != two.fingerprint()
    assert two.fingerprint() != plan_stages(cfg, 2, require_fit=False, tp=2, moe="ep").fingerprint()


def test_a_killed_tensor_rank_ends_every_process_with_a_named_error(hf_dir):
    """Rank 1 is stage 0's second tensor rank: the driver waits for it in every all-reduce."""
    proc = subprocess.Popen(
        [*CLI, "generate", "--model", hf_dir, "--tp", "2", "--prompt", "hello", "--max-new-tokens", "2000",
         "--max-len", "2048", "--temperature", "0", "--quiet", "--stage-timeout", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True)
    try:
        wait_for_output(proc, "[thinking] ", 180, then_bytes=4)
        kids = children(proc.pid)
        victim = next(p for p in kids if "--rank 1 " in cmdline(p))
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        time.sleep(0.5)
        left = [p for p in kids if alive(p)]
    finally:
        kill_tree(proc.pid)
    assert proc.returncode != 0
    assert "stage 0 tensor rank 1 (rank 1, pid" in err.decode(errors="replace"), err.decode(errors="replace")[-3000:]
    assert left == []
