"""`qwen-vl generate` on a GPU in each way a user starts it: one process, S = 2 started by the command itself, and
S = 2 started by torchrun (stages share a GPU over gloo where there is one, NCCL where each has its own; with two
GPUs or more, also two stages on one GPU). Every way gives the same tokens for a prompt with an image."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from procs import CLI
from qwen_vl_distributed.cli.synth import synthesize
from qwen_vl_distributed.engine.media import sample_image_path
from qwen_vl_distributed.pipeline.launch import free_port

pytestmark = pytest.mark.gpu


def generate(prefix: list[str], model: str, *extra: str, env: dict | None = None) -> list[int]:
    args = ["generate", "--model", model, "--prompt", "hi there", "--image", sample_image_path(),
            "--max-new-tokens", "12", "--temperature", "0", "--json", "--quiet", "--device", "cuda",
            "--max-total-tokens", "8192", *extra]
    r = subprocess.run(prefix + args, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert r.returncode == 0, f"{' '.join(prefix[-3:])} {' '.join(extra)}: {r.stderr[-2000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])["token_ids"]


def test_every_launch_mode_gives_the_same_tokens(tmp_path):
    model = synthesize(str(tmp_path / "tiny"))
    single = generate(CLI, model)
    modes = {"built-in launcher": generate(CLI, model, "--stages", "2"),
             "torchrun": generate([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                   "--master-port", str(free_port()), "-m", "qwen_vl_distributed"],
                                  model, "--stages", "2")}
    if torch.cuda.device_count() > 1:
        modes["two stages on one GPU"] = generate(CLI, model, "--stages", "2", env={"CUDA_VISIBLE_DEVICES": "0"})
    assert len(single) == 12
    assert {name: tokens for name, tokens in modes.items() if tokens != single} == {}
