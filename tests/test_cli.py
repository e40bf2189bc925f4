"""The CLI contract: `generate --json` fields, streaming, and one-line errors."""

from __future__ import annotations

import base64
import json
import subprocess

import pytest

from procs import CLI
from synth_model import tiny_model_dir
from qwen_vl_distributed.engine.media import sample_image_path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=300)


def test_generate_json_fields(model_dir):
    r = _run("generate", "--model", model_dir, "--prompt", "What is shown?", "--image", sample_image_path(),
             "--max-new-tokens", "6", "--temperature", "0", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("prompt_token_ids", "token_ids", "text", "reasoning", "content", "finish_reason", "timings"):
        assert key in out
    assert out["finish_reason"] in ("stop", "length")
    assert 1 <= len(out["token_ids"]) <= 6
    assert 151655 in out["prompt_token_ids"]  # the image placeholders
    assert out["prompt_token_ids"][-2:] == [151667, 198]  # the template opened <think>
    assert {"prefill_ms", "decode_ms_per_token"} <= set(out["timings"])


def test_messages_file_with_data_url_equals_prompt_and_image(model_dir, tmp_path):
    with open(sample_image_path(), "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is shown?"}]}]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(msgs))
    a = _run("generate", "--model", model_dir, "--messages", str(path), "--max-new-tokens", "5", "--temperature", "0",
             "--json", "--quiet")
    b = _run("generate", "--model", model_dir, "--prompt", "What is shown?", "--image", sample_image_path(),
             "--max-new-tokens", "5", "--temperature", "0", "--json", "--quiet")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ja, jb = (json.loads(x.stdout.strip().splitlines()[-1]) for x in (a, b))
    assert ja["prompt_token_ids"] == jb["prompt_token_ids"] and ja["token_ids"] == jb["token_ids"]


def test_streaming_shows_reasoning_apart(model_dir):
    r = _run("generate", "--model", model_dir, "--prompt", "hi", "--max-new-tokens", "4", "--temperature", "0",
             "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("[thinking] ")


@pytest.mark.parametrize("args,message", [
    (["--image", "/nonexistent.png"], "error: --image /nonexistent.png: file not found"),
    (["--stages", "0"], "error: --stages 0: must be at least 1"),
    (["--prefill-chunk", "0"], "error: --prefill-chunk 0: must be at least 1"),
    (["--temperature", "-1"], "error: temperature"),
])
def test_bad_input_is_one_line_error(model_dir, args, message):
    r = _run("generate", "--model", model_dir, "--prompt", "hi", "--quiet", *args)
    assert r.returncode == 2
    assert r.stderr.strip().startswith(message), r.stderr
    assert "Traceback" not in r.stderr


def test_not_a_checkpoint(tmp_path):
    r = _run("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert r.returncode == 2 and "no config.json" in r.stderr and "Traceback" not in r.stderr


def test_prompt_longer_than_context_is_refused_before_any_stage_starts(model_dir):
    r = _run("generate", "--model", model_dir, "--prompt", "hello " * 20, "--max-len", "16", "--stages", "2")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: the prompt is") and "--max-len 16" in r.stderr


def test_generate_with_a_video_file_uses_the_release_prompt_format(model_dir, tmp_path):
    from test_processor import write_video

    path = tmp_path / "clip.mp4"
    write_video(path, 8, 4)
    r = _run("generate", "--model", model_dir, "--prompt", "What happens?", "--video", str(path),
             "--max-new-tokens", "4", "--temperature", "0", "--json", "--quiet", "--stages", "2")
    assert r.returncode == 0, r.stderr
    ids = json.loads(r.stdout.strip().splitlines()[-1])["prompt_token_ids"]
    vstart, vpad, vend = 151652, 151656, 151653
    assert ids.count(vpad) > 0
    # one <|vision_start|> per temporal patch, each right after its timestamp text, never nested
    starts = [i for i, t in enumerate(ids) if t == vstart]
    assert len(starts) == 2 and all(ids[i - 1] != vend and ids[i - 1] != vstart for i in starts)
    assert ids.count(vend) == 2


def test_bench_pipeline_on_cpu_reports_each_phase(tmp_path):
    """The pipeline benchmark end to end on CPU (tiny random model, 2 stage processes, experts kept in fp8):
    latency, throughput, and each stage's busy time split into warm-up, one-sequence and throughput phases."""
    out = tmp_path / "b.json"
    r = _run("bench-pipeline", "--preset", "tiny", "--layers", "4", "--stages", "2", "--device", "cpu",
             "--sequences", "2", "--prompt-len", "16", "--new-tokens", "4", "--fp8", "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["fp8_experts"] is True and res["temperature"] == 1.0
    assert len(res["plan"]) == 2 and res["plan"][0][0] == 0 and res["plan"][-1][1] == 4
    assert res["throughput"]["sequences"] == 2 and res["throughput"]["tokens_per_s"] > 0
    for stage in res["stage_busy_s"]:
        # one sequence, 4 new tokens: its prompt step and 3 decode steps
        assert stage["single"]["steps"] == 4 and stage["warmup"]["steps"] > 0 and stage["throughput"]["steps"] > 0
        assert all(stage[p]["busy_s"] > 0 for p in ("warmup", "single", "throughput"))


def test_version(capsys):
    from qwen_vl_distributed import __version__
    from qwen_vl_distributed.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"qwen-vl {__version__}"


def test_loading_progress_into_a_file_is_one_line_per_stage():
    import io

    from qwen_vl_distributed.checkpoint.loader import Progress

    log = io.StringIO()  # not a terminal: no bar redrawn into it
    bar = Progress(3_000_000, "stage 1 (layers 2-3)", stream=log, position=1)
    for _ in range(3):
        bar.update(1_000_000)
    bar.close()
    assert log.getvalue().count("\n") == 1 and "\r" not in log.getvalue()
    assert log.getvalue().startswith("loaded stage 1 (layers 2-3): 0.00 GB in ")
