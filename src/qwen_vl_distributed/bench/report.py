"""Plain-text table of ``qwen-vl bench`` results (the JSON holds the same numbers and more)."""

from __future__ import annotations


def _f(x, fmt: str = ".3f") -> str:
    """A number as ``fmt``; None as "-"; anything else (a path that did not run says why) cut to 60 characters."""
    if x is None:
        return "-"
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)[:60]


def _decode(rows: dict, n_layers: int) -> list[str]:
    out = [f"decode (ours: ms per layer of a {n_layers}-layer stage, CUDA-graph replay; HF ms/L: its whole "
           f"{n_layers}-layer step incl. embedding + lm_head / {n_layers}; full = whole-model step ms)",
           f"{'B':>4} {'ours ms/L':>10} {'GB/s':>7} {'%copy':>6} {'experts':>8} {'HF ms/L':>8} {'x HF':>6} "
           f"{'ours full':>10} {'HF full':>8} {'tok/s 94L':>10}"]
    for b, r in rows.items():
        out.append(f"{b:>4} {_f(r.get('ours_ms_layer'), '.4f'):>10} {_f(r.get('ours_gbs'), '.0f'):>7} "
                   f"{_f(100 * r.get('ours_frac_copy_bw', 0), '.1f'):>6} {_f(r.get('unique_experts'), '.1f'):>8} "
                   f"{_f(r.get('hf_ms_layer')):>8} {_f(r.get('speedup'), '.1f'):>6} "
                   f"{_f(r.get('ours_full_step_ms')):>10} {_f(r.get('hf_full_step_ms')):>8} "
                   f"{_f(r.get('ours_whole_model_tok_s_extrapolated'), '.0f'):>10}")
    for b, r in rows.items():
        if "contiguous_kv_step_ms" in r:
            out.append(f"  B={b}: paged KV step {_f(r['ours_step_ms'], '.4f')} ms, contiguous KV "
                       f"{_f(r['contiguous_kv_step_ms'], '.4f')} ms: paged / contiguous "
                       f"{_f(r['paged_over_contiguous'], '.4f')}")
    return out


def _prefill(rows: dict, attention: dict) -> list[str]:
    out = ["prefill (one prompt, ms per layer, ours = fused layer kernels (module path with fast impls in "
           "brackets; with SDPA prompt attention after the slash); MFU = model matmul FLOPs / time / measured bf16 "
           "peak)",
           f"{'T':>6} {'ours ms/L':>10} {'(module)':>9} {'/ sdpa':>7} {'TFLOP/s':>8} {'MFU':>6} {'HF ms/L':>8} "
           f"{'HF MFU':>7} {'x HF':>6}"]
    for n, r in rows.items():
        out.append(f"{n:>6} {_f(r.get('ours_ms_layer')):>10} {_f(r.get('ours_module_path_ms_layer')):>9} "
                   f"{_f(r.get('ours_sdpa_attention_ms_layer')):>7} {_f(r.get('ours_tflops'), '.0f'):>8} "
                   f"{_f(100 * r.get('ours_mfu', 0), '.1f'):>5}% {_f(r.get('hf_ms_layer')):>8} "
                   f"{_f(100 * r['hf_mfu'] if 'hf_mfu' in r else None, '.1f'):>6}% {_f(r.get('speedup'), '.1f'):>6}")
    for n, r in rows.items():
        f = r.get("floor")
        if f:
            out.append(f"  T={n}: floor {_f(f['floor_ms'])} ms/L (experts {_f(f['experts_ms'])}, {f['experts_bound']}-"
                       f"bound; rest {_f(f['rest_ms'])}): MFU at the floor {_f(100 * f['mfu_at_floor'], '.1f')}%, "
                       f"ours at {_f(100 * r['ours_frac_of_floor'], '.1f')}% of the floor's speed")
    for n, r in rows.items():
        q = r.get("quack")
        if isinstance(q, str):
            out.append(f"  T={n}: quack experts not run: {q}")
        elif q:
            names = ("dispatched", "quack", "quack_tuned")
            out.append(f"  T={n}: experts call ms, as dispatched / quack / quack tuned: "
                       + " / ".join(_f(q[f"experts_{k}_ms"]) for k in names) + " (rel vs reference "
                       + " / ".join(f"{q[f'experts_{k}_rel_vs_reference']:.1e}" for k in names)
                       + f"); layers with quack {_f(q['quack_ms_layer'])} ms/L = "
                       f"{_f(q['quack_layer_vs_dispatched'], '.3f')} of as dispatched")
    for n, a in attention.items():
        if "prompt_triton_extend_ms" in a:
            out.append(f"  attention over the cache, T={n}, ms per call, Triton / SDPA: whole prompt "
                       f"{_f(a['prompt_triton_extend_ms'])} / {_f(a['prompt_sdpa_ms'])} (rel "
                       f"{a['prompt_rel_triton_vs_sdpa']:.1e}); chunk after T cached {_f(a['chunk_triton_extend_ms'])}"
                       f" / {_f(a['chunk_sdpa_ms'])} (rel {a['chunk_rel_triton_vs_sdpa']:.1e})")
        if "prompt_fa4_ms" in a:
            out.append(f"  the same through FA4 (prompt_fa4), T={n}: whole prompt {_f(a['prompt_fa4_ms'])} ms (rel "
                       f"{a['prompt_rel_fa4_vs_sdpa']:.1e}), chunk {_f(a['chunk_fa4_ms'])} ms (rel "
                       f"{a['chunk_rel_fa4_vs_sdpa']:.1e}); causal GQA alone: FA4 {_f(a.get('FA4'))} ms, cuDNN "
                       f"{_f(a.get('CUDNN_ATTENTION'))} ms")
    return out


def _tp(res: dict) -> list[str]:
    t = res["tp"]
    p = t["projection"]
    out = [f"tensor parallel: ms per layer of ONE rank's shard (no collectives; ep: the slowest rank, mean in "
           f"brackets); whole-model tok/s projected with {p['allreduce_us']:g} us per all-reduce (2 a layer, "
           f"{p['layers']} layers) + lm_head"]
    for key, row in t.items():
        if not key.startswith("N"):
            continue
        for b, ms in row["ms_layer"].items():
            mean = row.get("ms_layer_mean", {}).get(b)
            proj = p[f"{key}_B{b}"]
            out.append(f"  {key:<7} B={b:<3} {ms:.4f} ms/layer" + (f" ({mean:.4f})" if mean else "")
                       + f"  heads {row['heads']}/{row['kv_heads']}  {row['weight_gb_layer']:.2f} GB/layer"
                       + f"  -> {proj['step_ms']:.2f} ms/step, {proj['tok_s']:.0f} tok/s")
    out.append("  lm_head ms: " + ", ".join(f"B={b} {ms:.3f}" for b, ms in t["lm_head_ms"].items()))
    return out


def render(res: dict) -> str:
    v = res.get("versions", {})
    lines = [f"device {v.get('device')} | torch {v.get('torch')} | triton {v.get('triton')} | "
             f"transformers {v.get('transformers')} | cuda {v.get('cuda')} | cudnn {v.get('cudnn')}",
             f"command: {res.get('command')}"]
    c = res.get("ceilings")
    if c:
        lines.append(f"ceilings: copy {c['copy_gbs']:.0f} GB/s, bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s")
    if "decode" in res:
        lines += _decode(res["decode"], res.get("layers", 0))
    if "tp" in res:
        lines += _tp(res)
    pdl = res.get("decode_pdl", {})
    if "skipped" in pdl:
        lines.append(f"  programmatic dependent launch: skipped ({pdl['skipped']})")
    for b, r in pdl.items():
        if isinstance(r, dict):
            lines.append(f"  B={b}: programmatic dependent launch {_f(r['pdl_ms_layer'], '.4f')} ms/L, without "
                         f"{_f(r['plain_ms_layer'], '.4f')} ms/L: with / without {_f(r['pdl_over_plain'], '.4f')}, "
                         f"outputs {'identical' if r['equal'] else 'DIFFERENT'}")
    what = {"norm_router_rows": "residual + norm + router in two launches",
            "norm_qkv_rows": "the norm in the q/k/v GEMV"}
    for name, per_b in res.get("decode_norm_fusion", {}).items():
        for b, r in (per_b.items() if isinstance(per_b, dict) else ()):
            if isinstance(r, dict):
                lines.append(f"  B={b}: {what.get(name, name)} {_f(r['fused_ms_layer'], '.4f')} ms/L, as launches "
                             f"{_f(r['plain_ms_layer'], '.4f')} ms/L: fused / launches "
                             f"{_f(r['fused_over_plain'], '.4f')}"
                             + ("" if r["fused_here"] else " (not fused at this batch)")
                             + f", outputs {'identical' if r['equal'] else 'rel ' + _f(r['rel'], '.2e')}")
    var = res.get("decode_variants", {})
    if "skipped" in var:
        lines.append(f"  decode variants: {var['skipped']}: skipped")
    for name, per_b in var.items():
        for b, r in (per_b.items() if isinstance(per_b, dict) else ()):
            lines.append(f"  B={b}: {name} {_f(r['other_ms_layer'], '.4f')} ms/L against this run's "
                         f"({var['default']}) {_f(r['default_ms_layer'], '.4f')} ms/L: "
                         f"{_f(r['other_over_default'], '.4f')}, outputs "
                         + ("identical" if r["equal"] else "rel " + _f(r["rel"], ".2e")))
    for b, parts in res.get("decode_breakdown", {}).items():
        lines.append(f"  B={b} us/layer by launch group: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    if "prefill" in res:
        lines += _prefill(res["prefill"], res.get("prefill_attention", {}))
    for n, t in res.get("prefill_moe_tuning", {}).items():
        ms = t["triton_ms"].get(t["triton_best"])
        lines.append(f"  experts at {n} tokens: grouped_mm {_f(t['grouped_ms'])} ms, Triton {_f(ms)} ms "
                     f"({t['triton_best']}) -> {t['chosen']}")
    for use, t in res.get("gemv_tuning", {}).items():
        lines.append(f"  gemv {use}: chosen {t['chosen']} | " + ", ".join(
            f"{k} {v:.1f}us" if isinstance(v, float) else f"{k} {v}" for k, v in t["us_per_layer"].items()))
    f8 = res.get("fp8")
    if f8:
        same = ", ".join(f"{k[6:]} {'identical' if v else 'DIFFERENT'}" for k, v in f8.items()
                         if k.startswith("equal_"))
        lines.append(f"fp8-resident experts ({f8['block'][0]}x{f8['block'][1]} blocks) vs the same weights "
                     f"dequantised to bf16: {same}")
        for k, r in f8.items():
            if k.startswith("experts_"):
                lines.append(f"  one experts call, {k[8:]}: rel vs fp32 products fp8 {r['rel_fp8_vs_fp32']:.2e}, "
                             f"bf16 {r['rel_bf16_vs_fp32']:.2e}; fp8 vs bf16 {r['rel_fp8_vs_bf16']:.2e}, "
                             f"{100 * r['equal_frac']:.1f}% of elements equal; "
                             f"W8A8 {_f(r.get('rel_w8a8_vs_fp32'), '.2e')} "
                             f"(vs its reference {_f(r.get('rel_w8a8_vs_w8a8_reference'), '.1e')})")
        if "act_quant" in f8:
            q = f8["act_quant"]
            lines.append(f"  W8A8 input quantisation vs reference: scales {'equal' if q['scales_equal'] else 'DIFFER'}"
                         f", {100 * q['values_equal_frac']:.3f}% of fp8 values equal")
        for name, part in (("fp8", f8), ("W8A8", f8.get("w8a8", {}))):
            for b, r in part.get("decode", {}).items():
                lines.append(f"  {name} decode B={b}: {_f(r['ms_layer'], '.4f')} ms/L "
                             f"(bf16 {_f(r.get('bf16_ms_layer'), '.4f')}), {_f(r['gbs'], '.0f')} GB/s, "
                             f"{_f(100 * r['frac_copy_bw'], '.1f')}% copy, {_f(r['unique_experts'], '.1f')} experts")
            for t, r in part.get("prefill", {}).items():
                lines.append(f"  {name} prefill {t}: {_f(r['ms_layer'])} ms/L (bf16 {_f(r.get('bf16_ms_layer'))}), "
                             f"MFU {_f(100 * r['mfu'], '.1f')}%")
        lines += _experts_ab(f8.get("call_ab", {}))
    vis = res.get("vision")
    if vis:
        lines.append(f"vision {vis['grid']}: ours {_f(vis.get('ours_fast_ms'))} ms "
                     f"(graph, fused blocks: exact {_f(vis.get('ours_graph_ms'))}, bucket "
                     f"{_f(vis.get('ours_graph_bucket_ms'))}; graph, module blocks "
                     f"{_f(vis.get('ours_graph_unfused_ms'))}, eager {_f(vis.get('ours_eager_fast_ms'))}, "
                     f"fused graph vs eager rel {_f(vis.get('rel_graph_vs_eager'), '.1e')}; "
                     f"reference attention {_f(vis.get('ours_reference_ms'))} ms, "
                     f"{_f(vis.get('ours_tflops'), '.0f')} TFLOP/s), HF {_f(vis.get('hf_ms'))} ms, "
                     f"rel vs HF {_f(vis.get('rel_fast_vs_hf'), '.2e')}")
        alone = vis.get("attention_only_ms", {})
        lines.append("  one image's attention alone, ms per call: " + ", ".join(
            f"{k} {_f(t)}" for k, t in alone.items() if isinstance(t, float) and not k.endswith("fp32"))
            + (f" (FA4 rel vs fp32 {alone['FA4_rel_vs_fp32']:.1e}, two segments "
               f"{alone['two_segments_FA4_rel_vs_fp32']:.1e})" if "FA4_rel_vs_fp32" in alone else "")
            + f"; FA4: {vis.get('fa4', '-')}; fp8 linears (--vision-fp8): graph {_f(vis.get('fp8_linears_graph_ms'))}"
            f" ms, eager {_f(vis.get('fp8_linears_eager_ms'))} ms, rel vs bf16 "
            f"{_f(vis.get('rel_fp8_linears_vs_bf16'), '.1e')}; backend orders ms: "
            + ", ".join(f"{k} {_f(t)}" for k, t in vis.get("backend_orders_ms", {}).items()))
    par = res.get("parity", {})
    if "kernels" in par:
        k = par["kernels"]
        lines.append("kernels vs reference (rel L2): " + ", ".join(
            f"{name} {val:.2e}" for name, val in k.items() if isinstance(val, float) and name != "tolerance")
            + f" -> {'pass' if k.get('pass') else 'FAIL'}")
    if "logits" in par:
        lg = par["logits"]
        lines.append(f"logits vs HF (rel L2): fast {lg['rel_fast_vs_hf']:.2e}, module layers with fast impls "
                     f"{lg.get('rel_module_fast_vs_hf', float('nan')):.2e}, reference {lg['rel_ref_vs_hf']:.2e}, "
                     f"HF eager vs grouped {lg['rel_hf_eager_vs_grouped']:.2e}; tolerance {lg['tolerance']:.2e}; "
                     f"top-1 agree {lg['top1_agree']:.3f} -> {'pass' if lg['pass'] else 'FAIL'}")
    if "greedy" in par:
        g = par["greedy"]
        lines.append(f"greedy {len(g['hf'])} tokens identical to HF: {g['identical']}; decode-step logits vs HF "
                     f"(rel L2) mean {g.get('decode_logits_rel_vs_hf_mean', 0):.2e} "
                     f"max {g.get('decode_logits_rel_vs_hf_max', 0):.2e} (reference path: mean "
                     f"{g.get('reference_decode_rel_vs_hf_mean', 0):.2e} "
                     f"max {g.get('reference_decode_rel_vs_hf_max', 0):.2e})"
                     f" -> {'pass' if g.get('pass') else 'FAIL'}")
    for name, err in res.get("errors", {}).items():
        lines.append(f"ERROR in {name}: {err}")
    return "\n".join(lines)


def _experts_ab(ab: dict) -> list[str]:
    """One experts call alone per prefill length: each path's ms and its speed-up over bf16."""
    names = {"fp8": "fp8", "w8a8_apart": "W8A8 separate quant", "w8a8_fused": "W8A8 fused quant",
             "w8a8_fused_h": "W8A8 h quant fused"}
    lines = []
    for t, r in ab.items():
        ms, up = r["ms"], r["speedup_vs_bf16"]
        same = " and ".join(f"{names[k]} {'identical' if r[f'{k}_equal'] else 'DIFFERENT'}"
                            for k in ("w8a8_fused", "w8a8_fused_h") if f"{k}_equal" in r)
        lines.append(f"  experts call alone, {t} tokens: bf16 {_f(ms['bf16'], '.3f')} ms, " + ", ".join(
            f"{label} {_f(ms[k], '.3f')} ms ({_f(up[k], '.2f')}x)" for k, label in names.items() if k in ms)
            + f"; vs separate: {same}")
    return lines
