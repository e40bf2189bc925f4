import dataclasses
import itertools
import json

import pytest

from qwen_vl_distributed.cli.main import main
from qwen_vl_distributed.model.config import QuantizationConfig, config_to_dict, preset
from qwen_vl_distributed.model.param_counts import component_bytes, total_weight_bytes
from qwen_vl_distributed.pipeline.plan import GB, PlanError, plan_stages

BIG = preset("235b-a22b")


def tiny(layers: int, vocab: int | None = None, deepstack: tuple[int, ...] | None = None):
    """The tiny preset with ``layers`` decoder layers; a small vocab makes lm_head cost ~nothing."""
    cfg = preset("tiny")
    text = dataclasses.replace(cfg.text, num_hidden_layers=layers, vocab_size=vocab or cfg.text.vocab_size)
    vision = cfg.vision if deepstack is None else dataclasses.replace(cfg.vision, deepstack_visual_indexes=deepstack)
    return dataclasses.replace(cfg, text=text, vision=vision)


def counts(plan):
    return [s.num_layers for s in plan.stages]


def check_invariants(plan, cfg):
    """Contiguous ranges covering every layer, ownership flags, stage 0 owning the DeepStack layers."""
    ranges = plan.layer_ranges
    assert ranges[0][0] == 0 and ranges[-1][1] == cfg.text.num_hidden_layers
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(stop - start >= 1 for start, stop in ranges)
    assert ranges[0][1] >= cfg.num_deepstack
    assert [s.holds_vision for s in plan.stages] == [True] + [False] * (len(ranges) - 1)
    assert [s.holds_embed for s in plan.stages] == [True] + [False] * (len(ranges) - 1)
    assert [s.holds_head for s in plan.stages] == [False] * (len(ranges) - 1) + [True]


# --------------------------------------------------------------------------------------------------------------------
# Shapes of splits


def test_single_stage_holds_everything():
    plan = plan_stages(BIG, 1)
    (stage,) = plan.stages
    assert plan.layer_ranges == ((0, 94),)
    assert stage.holds_vision and stage.holds_embed and stage.holds_head
    assert stage.weights_bytes == total_weight_bytes(BIG, "bf16")


def test_even_split_when_head_is_cheap():
    cfg = tiny(12, vocab=16)
    plan = plan_stages(cfg, 4, dtype="fp32")
    assert counts(plan) == [3, 3, 3, 3]
    check_invariants(plan, cfg)


def test_odd_layer_count_seven_layers_three_stages():
    cfg = tiny(7, vocab=16, deepstack=(0,))
    plan = plan_stages(cfg, 3, dtype="fp32")
    check_invariants(plan, cfg)
    assert sorted(counts(plan)) == [2, 2, 3]
    # with three DeepStack layers stage 0 must keep 3 of the 7
    plan = plan_stages(tiny(7, vocab=16), 3, dtype="fp32")
    assert counts(plan) == [3, 2, 2]


def test_expensive_head_pushes_layers_off_the_last_stage():
    # tiny: lm_head (vocab 151936 x 64) is worth ~440 layers of decode bytes, so the last stage keeps one layer
    assert counts(plan_stages(tiny(7), 3, dtype="fp32")) == [3, 3, 1]


def test_235b_s4_unbudgeted_last_stage_lighter():
    plan = plan_stages(BIG, 4)
    check_invariants(plan, BIG)
    assert counts(plan) == [24, 24, 24, 22]  # lm_head ~2.8 layers of decode bytes
    assert plan.layer_ranges == ((0, 24), (24, 48), (48, 72), (72, 94))


def test_235b_s4_h200_first_and_last_lighter():
    # with 141 GB and whole 32k-token prompts in one pass, a 24-layer stage 0 (vision + embedding + vision
    # workspace) no longer fits
    plan = plan_stages(BIG, 4, gpu_mem_gb=141, prefill_chunk=32768)
    assert counts(plan) == [23, 24, 24, 23]
    assert all(s.fits for s in plan.stages)
    middle = min(counts(plan)[1:-1])
    assert counts(plan)[0] < middle and counts(plan)[-1] < middle


def test_235b_s4_h200_default_chunks_leave_room():
    # the default 8192-token prefill chunks need a quarter of that workspace: the unbudgeted split fits as it is
    plan = plan_stages(BIG, 4, gpu_mem_gb=141)
    assert plan.prefill_chunk == 8192
    assert counts(plan) == [24, 24, 24, 22] and all(s.fits for s in plan.stages)
    whole = plan_stages(BIG, 4, gpu_mem_gb=141, prefill_chunk=32768)
    assert plan.stages[1].act_bytes < whole.stages[1].act_bytes


def test_step_budget_is_bounded_by_all_sequences_not_one():
    # 8 sequences of up to 300 tokens: one step may carry all 8 prompts (2400 tokens), never more
    plan = plan_stages(BIG, 2, max_seq_len=300, max_batch=8)
    assert plan.prefill_chunk == 2400
    assert plan_stages(BIG, 2, max_seq_len=300, max_batch=8, prefill_chunk=10**6).prefill_chunk == 2400
    assert plan_stages(BIG, 2, max_seq_len=300, max_batch=8, prefill_chunk=500).prefill_chunk == 500
    assert plan_stages(BIG, 2, max_seq_len=20000, max_batch=8).prefill_chunk == 8192
    one = plan_stages(BIG, 2, max_seq_len=300, max_batch=8, prefill_chunk=300)
    assert one.stages[1].act_bytes < plan.stages[1].act_bytes  # the workspace estimate follows the budget


def test_235b_fp8_last_stage_pays_for_bf16_head():
    plan = plan_stages(BIG, 4, dtype="fp8", gpu_mem_gb=141)
    assert counts(plan) == [24, 25, 25, 20]  # the bf16 lm_head is ~4.2 fp8 layers


def test_plan_is_deterministic():
    a = plan_stages(BIG, 8, dtype="fp8", gpu_mem_gb=141)
    b = plan_stages(BIG, 8, dtype="fp8", gpu_mem_gb=141)
    assert a == b and a.to_json() == b.to_json()
    assert a.fingerprint() == b.fingerprint()


# --------------------------------------------------------------------------------------------------------------------
# Memory and cost figures


def test_stage_bytes_add_up():
    # without budgets the KV pool is max_seq_len x max_batch tokens, in blocks of 16, plus one scratch block
    plan = plan_stages(BIG, 4, max_seq_len=8192, max_batch=3)
    assert sum(s.weights_bytes for s in plan.stages) == total_weight_bytes(BIG, "bf16")
    per_layer_kv = 94 * 2 * 4 * 128 * 2  # 192,512 B per token of context, all layers
    assert plan.max_total_tokens == 8192 * 3 and plan.kv_blocks == 8192 * 3 // 16
    assert sum(s.kv_bytes for s in plan.stages) == per_layer_kv * (8192 * 3 + 16)
    for s in plan.stages:
        assert s.kv_bytes == s.num_layers * 2 * 4 * 128 * 2 * (8192 * 3 + 16)
        assert s.total_bytes == s.weights_bytes + s.kv_bytes + s.act_bytes


def test_kv_pool_is_what_the_tightest_stage_has_left_or_what_was_asked():
    plan = plan_stages(BIG, 4, gpu_mem_gb=141)
    room = min(s.kv_capacity_tokens for s in plan.stages)
    assert plan.stages[0].kv_capacity_tokens == room  # stage 0 also holds the vision tower
    assert plan.max_total_tokens == (room // 16 - 1) * 16 and plan.fits  # whole blocks, the scratch one apart
    assert plan.sequences_of(32768) == plan.max_total_tokens // 32768 >= 5
    assert plan.stages[0].total_bytes <= plan.stages[0].budget_bytes < plan.stages[0].total_bytes + 16 * 24 * 4096
    asked = plan_stages(BIG, 4, gpu_mem_gb=141, max_total_tokens=100_000, kv_block_size=64)
    assert asked.max_total_tokens == 100_032 and asked.kv_blocks == 1563 and asked.fits
    assert asked.stages[1].kv_bytes == 24 * 2 * 4 * 128 * 2 * (1563 + 1) * 64
    too_much = plan_stages(BIG, 4, gpu_mem_gb=141, max_total_tokens=10**6, require_fit=False)
    assert too_much.fits is False
    with pytest.raises(PlanError, match="stage 0"):
        plan_stages(BIG, 4, gpu_mem_gb=141, max_total_tokens=10**6)
    # the layers are placed so that max_batch sequences of max_seq_len fit; where they cannot, the plan does not
    assert plan_stages(BIG, 4, gpu_mem_gb=141, max_batch=7).fits
    assert plan_stages(BIG, 4, gpu_mem_gb=141, max_batch=40, require_fit=False).fits is False


def test_plan_reports_the_kv_pool_in_its_json_and_table():
    from qwen_vl_distributed.cli.plan import format_plan

    plan = plan_stages(BIG, 2, gpu_mem_gb=141, dtype="fp8", max_batch=3)
    d = json.loads(plan.to_json())
    assert d["max_total_tokens"] == plan.max_total_tokens and d["sequences_of_32k"] == plan.sequences_of(32768)
    assert [s["kv_capacity_tokens"] for s in d["stages"]] == [s.kv_capacity_tokens for s in plan.stages]
    lines = format_plan(plan, "235b")
    assert f"KV cache: {plan.max_total_tokens} tokens" in lines[-1] and "32k tokens at once" in lines[-1]


def test_decode_cost_counts_head_on_last_stage_only():
    b = component_bytes(BIG, "bf16")
    plan = plan_stages(BIG, 2, layers_per_stage=[50, 44])
    first, last = plan.stages
    assert first.decode_bytes == 50 * b.layer_active
    assert last.decode_bytes == 44 * b.layer_active + b.lm_head + b.final_norm


def test_workspace_is_larger_on_stage_zero_and_grows_with_chunk():
    plan = plan_stages(BIG, 3)
    assert plan.stages[0].act_bytes > plan.stages[1].act_bytes  # vision tower activations
    assert plan.stages[2].act_bytes > plan.stages[1].act_bytes  # sampling logits
    whole = plan_stages(BIG, 3, prefill_chunk=32768)
    assert plan.stages[1].act_bytes < whole.stages[1].act_bytes  # default: 8192-token chunks
    # a chunk under the largest image (16384 tokens) buys nothing more: the engine never splits an image
    assert plan_stages(BIG, 3, prefill_chunk=4096).stages[1].act_bytes == plan.stages[1].act_bytes
    small_images = plan_stages(BIG, 3, prefill_chunk=4096, max_image_tokens=1024)
    assert small_images.stages[1].act_bytes < plan.stages[1].act_bytes


def test_heterogeneous_budgets_give_small_gpus_fewer_layers():
    uniform = plan_stages(BIG, 3, dtype="fp8", gpu_mem_gb=141)
    small_first = plan_stages(BIG, 3, dtype="fp8", gpu_mem_gb=[80, 141, 141])
    small_last = plan_stages(BIG, 3, dtype="fp8", gpu_mem_gb=[141, 141, 80])
    for plan in (uniform, small_first, small_last):
        check_invariants(plan, BIG)
        assert all(s.total_bytes <= s.budget_bytes for s in plan.stages)
    assert counts(small_first)[0] < counts(uniform)[0]
    assert counts(small_first)[0] < min(counts(small_first)[1:])
    assert small_first.stages[0].budget_bytes == 80 * GB


def test_balancer_is_optimal_against_brute_force():
    cfg = dataclasses.replace(BIG, text=dataclasses.replace(BIG.text, num_hidden_layers=20))
    budgets = [35, 45, 60, 40]
    best = None
    for cut in itertools.combinations(range(1, 20), 3):
        split = [b - a for a, b in zip((0,) + cut, cut + (20,))]
        if split[0] < 3:
            continue
        plan = plan_stages(cfg, 4, layers_per_stage=split, gpu_mem_gb=budgets, require_fit=False)
        if plan.fits:
            key = (max(s.decode_bytes for s in plan.stages), sum(s.decode_bytes ** 2 for s in plan.stages))
            best = key if best is None else min(best, key)
    plan = plan_stages(cfg, 4, gpu_mem_gb=budgets)
    assert (max(s.decode_bytes for s in plan.stages), sum(s.decode_bytes ** 2 for s in plan.stages)) == best


# --------------------------------------------------------------------------------------------------------------------
# Fingerprint and JSON


def test_fingerprint_depends_on_ranges_only():
    a = plan_stages(BIG, 2, layers_per_stage=[47, 47])
    assert len(a.fingerprint()) == 16 and int(a.fingerprint(), 16) >= 0
    assert a.fingerprint() == plan_stages(BIG, 2, layers_per_stage=[47, 47], dtype="fp8", max_batch=1).fingerprint()
    assert a.fingerprint() != plan_stages(BIG, 2, layers_per_stage=[48, 46]).fingerprint()


def test_to_json_round_trip():
    plan = plan_stages(BIG, 4, gpu_mem_gb=141)
    d = json.loads(plan.to_json())
    assert d["fingerprint"] == plan.fingerprint() and d["num_layers"] == 94 and d["balanced"] is True
    assert tuple((s["start"], s["stop"]) for s in d["stages"]) == plan.layer_ranges
    assert d["stages"][0]["holds_vision"] and d["stages"][-1]["holds_head"]
    assert d["stages"][1]["total_bytes"] == plan.stages[1].total_bytes and d["stages"][1]["fits"] is True


def test_stage_of_layer():
    plan = plan_stages(BIG, 4)
    assert [plan.stage_of_layer(i) for i in (0, 23, 24, 93)] == [0, 0, 1, 3]
    with pytest.raises(IndexError):
        plan.stage_of_layer(94)


# --------------------------------------------------------------------------------------------------------------------
# Errors: every message exactly


def error(*args, **kwargs) -> str:
    with pytest.raises(PlanError) as e:
        plan_stages(*args, **kwargs)
    return str(e.value)


def test_error_more_stages_than_layers():
    assert error(BIG, 95) == "cannot split 94 decoder layers into 95 stages (each stage needs at least one layer)"


def test_error_zero_stages():
    assert error(BIG, 0) == "number of stages must be at least 1, got 0"


def test_error_too_many_stages_for_deepstack():
    assert error(tiny(4), 3) == ("cannot split 4 decoder layers into 3 stages: stage 0 must own the 3 DeepStack "
                                 "layers and every other stage at least one layer (at most 2 stages)")


def test_error_fewer_layers_than_deepstack_layers():
    """(Random-weight benchmarks choose the layer count: 2 layers of the tiny preset, whose vision taps 3.)"""
    for layers_per_stage in (None, [2]):
        assert error(tiny(2), 1, layers_per_stage=layers_per_stage) == (
            "2 decoder layers are fewer than the model's 3 DeepStack layers (vision_config.deepstack_visual_indexes), "
            "which stage 0 must hold")


def test_error_layers_do_not_sum():
    assert error(BIG, 3, layers_per_stage=[30, 30, 30]) == \
        "layers per stage sum to 90 but the model has 94 decoder layers"


def test_error_layers_list_length():
    assert error(BIG, 4, layers_per_stage=[47, 47]) == "layers per stage lists 2 entries for 4 stages"


def test_error_stage_without_layers():
    assert error(BIG, 3, layers_per_stage=[47, 47, 0]) == \
        "layers per stage: stage 2 gets 0 layers (each stage needs at least 1)"


def test_error_deepstack_layers_off_stage_zero():
    assert error(BIG, 3, layers_per_stage=[2, 46, 46]) == \
        "layers per stage: stage 0 gets 2 layers but must own the 3 DeepStack layers 0-2"


def test_error_budget_list_length():
    assert error(BIG, 4, gpu_mem_gb=[80, 141]) == "GPU memory budgets list 2 values for 4 stages"


def test_error_budget_not_positive():
    assert error(BIG, 2, gpu_mem_gb=[141, 0]) == "GPU memory budget of stage 1 must be positive, got 0 GB"


def test_error_bad_dtype_and_limits():
    assert error(BIG, 2, dtype="int4") == "dtype must be one of bf16, fp8, fp32, got 'int4'"
    assert error(BIG, 2, max_seq_len=0) == "max_seq_len must be at least 1, got 0"
    assert error(BIG, 2, max_batch=-1) == "max_batch must be at least 1, got -1"


def test_error_explicit_split_does_not_fit():
    assert error(BIG, 4, layers_per_stage=[20, 20, 20, 34], gpu_mem_gb=141) == \
        "stage 3 (layers 60-93) needs 186.4 GB > 141 GB budget"


def test_error_no_balanced_split_fits():
    assert error(BIG, 2, gpu_mem_gb=141) == \
        "no split fits the memory budgets: stage 0 (layers 0-46) needs 258.7 GB > 141 GB budget"


def test_misfit_plan_returned_without_require_fit():
    plan = plan_stages(BIG, 2, gpu_mem_gb=141, require_fit=False)
    assert plan.fits is False and [s.fits for s in plan.stages] == [False, False]
    assert plan_stages(BIG, 2).fits is None  # no budget, nothing to judge


# --------------------------------------------------------------------------------------------------------------------
# CLI


BF16_GPU = ["--device", "cuda", "--gpu-mem", "141", "--max-len", "32768", "--max-batch", "4"]


def test_cli_table(capsys):
    assert main(["plan", "--preset", "235b-a22b", "--stages", "4", *BF16_GPU]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["stage", "layers", "holds"]
    assert lines[2].split()[:4] == ["0", "0-23", "vision+embed", "121.9"]
    assert lines[5].split()[:3] == ["3", "72-93", "norm+head"]
    assert lines[6].split()[0] == "total" and lines[6].split()[-2] == "yes"
    assert lines[7].startswith("KV cache: ") and len(lines) == 8


def test_cli_misfit_prints_table_then_fails(capsys):
    rc = main(["plan", "--preset", "235b-a22b", "--stages", "2", *BF16_GPU])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "NO" in out.splitlines()[2]
    assert err == "error: no split fits the memory budgets: stage 0 (layers 0-46) needs 258.7 GB > 141 GB budget\n"


def test_cli_layers_per_stage_and_json(capsys):
    assert main(["plan", "--preset", "235b-a22b", "--stages", "3", "--layers-per-stage", "30,32,32", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [s["stop"] - s["start"] for s in d["stages"]] == [30, 32, 32] and d["balanced"] is False


def test_cli_bad_split_is_one_line_error(capsys):
    assert main(["plan", "--preset", "235b-a22b", "--stages", "3", "--layers-per-stage", "30,30,30"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: layers per stage sum to 90 but the model has 94 decoder layers\n"


def test_cli_fp8_checkpoint_plans_as_fp8_experts_says(tmp_path, capsys):
    from qwen_vl_distributed.engine.build import fp8_kernels_run_here

    cfg = dataclasses.replace(BIG, quantization=QuantizationConfig())
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(cfg)))

    def dtype(*extra: str) -> str:
        assert main(["plan", "--model", str(tmp_path), "--stages", "2", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["dtype"]

    assert dtype("--device", "cuda", "--fp8-experts", "keep") == "fp8"
    assert dtype("--device", "cuda", "--fp8-experts", "dequantize") == "bf16"
    assert dtype("--device", "cuda") == ("fp8" if fp8_kernels_run_here("cuda") else "bf16")  # auto: by this machine
    assert dtype() == "fp32"  # serve's default device is the CPU
    assert main(["plan", "--preset", "235b-a22b", "--stages", "2", "--json", "--device", "cuda",
                 "--fp8-experts", "keep"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "fp8"


@pytest.mark.parametrize("options", [[], ["--device", "cuda", "--gpu-mem", "80"],
                                     ["--max-batch", "3", "--max-len", "1000", "--prefill-chunk", "300"],
                                     ["--tp", "2", "--moe-parallel", "ep"], ["--tensor-parallel-size", "4"]])
def test_cli_plan_is_the_plan_serve_uses(tmp_path, capsys, options):
    """One source for the options and their defaults: plan's table is what serve would load with the same
    arguments."""
    from qwen_vl_distributed.checkpoint.hub import resolve_model
    from qwen_vl_distributed.cli.main import build_parser
    from qwen_vl_distributed.cli.options import run_options
    from qwen_vl_distributed.engine.build import make_plan

    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(BIG)))
    argv = ["--model", str(tmp_path), "--stages", "4", *options]
    main(["plan", *argv, "--json"])
    shown = json.loads(capsys.readouterr().out)
    serve = build_parser().parse_args(["serve", *argv])
    opts = run_options(serve, resolve_model(str(tmp_path)))
    plan = make_plan(BIG, opts, require_fit=False)
    assert shown == json.loads(plan.to_json())
    assert shown["tp"] == opts.tensor_parallel and (shown["moe"] == "ep") == ("ep" in options)  # --tp reached it
