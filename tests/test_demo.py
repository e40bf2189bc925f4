"""`qwen-vl demo`, the main job: 2 stages as 2 processes, a streamed multimodal chat, parity with HF."""

from __future__ import annotations

import subprocess

from procs import CLI
from synth_model import tiny_model_dir


def test_demo_runs_and_matches_hf(tmp_path_factory):
    model = tiny_model_dir(tmp_path_factory)
    r = subprocess.run(CLI + ["demo", "--model", model, "--max-new-tokens", "8"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "== stage plan (2 stages" in out
    assert "[thinking] " in out
    assert "stage 0: busy" in out and "stage 1: busy" in out
    assert "-> IDENTICAL to HF transformers" in out
