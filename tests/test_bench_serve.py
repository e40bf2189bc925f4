"""``qwen-vl bench-serve``: its figures from known request results, its client against a scripted server, and the
whole command starting a server over random tiny weights (prefix cache on and off)."""

from __future__ import annotations

import asyncio
import json

import pytest

from qwen_vl_distributed.bench import serve_load as sl
from qwen_vl_distributed.cli.bench_serve import parse_rates, sweep
from qwen_vl_distributed.cli.main import main
from qwen_vl_distributed.errors import UserError


def test_summary_of_known_results():
    ok = [sl.RequestResult(True, ttft=0.1 * (i + 1), itl=[0.01, 0.03], latency=0.1 * (i + 1) + 0.04,
                           prompt_tokens=100, completion_tokens=3, cached_tokens=50) for i in range(4)]
    res = sl.summarize(ok + [sl.RequestResult(False, error="HTTP 503: busy")], duration=2.0)
    assert (res["completed"], res["failed"], res["errors"]) == (4, 1, ["HTTP 503: busy"])
    assert res["request_throughput"] == 2.0 and res["output_throughput"] == 6.0
    assert res["total_token_throughput"] == 206.0 and res["cached_prompt_fraction"] == 0.5
    assert res["mean_ttft_ms"] == pytest.approx(250.0) and res["median_ttft_ms"] == pytest.approx(250.0)
    assert res["p99_ttft_ms"] == pytest.approx(400.0)
    assert res["mean_tpot_ms"] == pytest.approx(20.0)  # (latency - ttft) / (3 - 1)
    assert res["median_itl_ms"] == pytest.approx(20.0) and res["p99_itl_ms"] == pytest.approx(30.0)


def test_rates_must_be_positive_numbers():
    assert parse_rates("0.5,2,inf") == [0.5, 2.0, float("inf")]
    for bad in ("", "fast", "0", "-1,2"):
        with pytest.raises(UserError, match="--rates"):
            parse_rates(bad)


def test_requests_of_a_round_are_new_but_share_the_prefix_and_its_images():
    spec = sl.LoadSpec(dataset="shared-prefix", num_prompts=3, input_len=10, prefix_len=20, images=1,
                       image_size=32)
    cal = sl.Calibration(overhead=0.0, per_word=1.0)
    a, b = sl.build_requests(spec, cal, 1), sl.build_requests(spec, cal, 2)
    texts = [r.messages[0]["content"][-1]["text"] for r in a + b]
    assert len(set(texts)) == 6 and len({t.split("\n\n")[0] for t in texts}) == 1
    assert len({r.messages[0]["content"][0]["image_url"]["url"] for r in a + b}) == 1
    rand = sl.build_requests(sl.LoadSpec(num_prompts=2, input_len=10, images=1, image_size=32), cal, 1)
    assert rand[0].messages[0]["content"][0] != rand[1].messages[0]["content"][0]  # each its own image


def test_sweep_measures_every_token_of_a_scripted_server(tmp_path):
    from test_server import IM_END, scripted_engine, serve
    from qwen_vl_distributed.checkpoint.synth_processor import write_processor_files
    from qwen_vl_distributed.engine.processor import Processor
    from qwen_vl_distributed.model.config import preset

    write_processor_files(tmp_path)
    processor = Processor.from_pretrained(tmp_path, preset("tiny"))
    script = processor.encode(" the answer is yes and so on")  # no <|im_end|>: every request runs to max_tokens
    assert IM_END not in script
    engine = scripted_engine(script, slots=4, max_len=4096, step_s=0.002)
    spec = sl.LoadSpec(num_prompts=5, input_len=20, output_len=6)
    with serve(engine, processor, max_queue=64) as (server, _):
        out = asyncio.run(sweep(server.url, None, spec, [float("inf"), 50.0], None, warmup=1))
    assert out["model"] == "tiny" and set(out["rates"]) == {"inf", "50.0"}
    for row in out["rates"].values():
        assert row["completed"] == 5 and row["failed"] == 0 and row["mean_output_tokens"] == 6
        assert row["mean_ttft_ms"] > 0 and row["mean_itl_ms"] > 0 and row["p99_itl_ms"] >= row["median_itl_ms"]
        assert set(row["server_counters"]) == {"prefix_cache_queries_total", "prefix_cache_hits_total",
                                               "num_preemptions_total"}


@pytest.mark.slow
def test_bench_serve_starts_a_random_weight_server_and_reports_prefix_cache_hits(tmp_path):
    args = ["bench-serve", "--preset", "tiny", "--device", "cpu", "--max-len", "1024", "--num-prompts", "4",
            "--dataset", "shared-prefix", "--prefix-len", "96", "--input-len", "24", "--output-len", "3",
            "--rates", "inf", "--warmup", "1"]  # the warm-up request leaves the shared prefix in the cache
    results = {}
    for cache in ("on", "off"):
        out = tmp_path / f"{cache}.json"
        assert main(args + ["--json", str(out)] + (["--no-prefix-cache"] if cache == "off" else [])) == 0
        results[cache] = json.loads(out.read_text())["rates"]["inf"]
    on, off = results["on"], results["off"]
    assert on["completed"] == off["completed"] == 4 and on["mean_output_tokens"] == 3
    assert on["cached_prompt_fraction"] > 0.3 and on["server_counters"]["prefix_cache_hits_total"] > 0
    assert off["cached_prompt_fraction"] == 0 and off["server_counters"]["prefix_cache_hits_total"] == 0
