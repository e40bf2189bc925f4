"""``qwen-vl demo``: the whole system on the embedded default, on a fresh machine.

Synthesises a tiny random model on first run (.demo/tiny-model), starts a 2-stage pipeline as 2 processes, serves it
on loopback, sends one multimodal chat request (the sample image shipped in the package) through the
OpenAI-compatible API, streams the reasoning and the answer, then prints the stage plan, per-stage timings and a
parity check of the same prompt against HF transformers. Point ``--model`` at a real checkpoint to run that instead
(``--stages`` and ``--device cuda`` as needed; the HF parity check is skipped for models too big to load twice).
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.request

from ..engine.build import RunOptions, read_generation_config, start_engine
from ..engine.media import MediaOptions, sample_image_path
from ..engine.processor import Processor
from ..model.param_counts import total_weight_bytes
from .plan import format_plan
from .synth import synthesize

DEFAULT_DIR = os.path.join(".demo", "tiny-model")
QUESTION = "What is in this picture? Answer in one sentence."
PARITY_TOKENS = 24


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole system on a tiny synthetic model (or --model DIR)")
    p.add_argument("--model", default=None, help=f"checkpoint directory (default: synthesise {DEFAULT_DIR})")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--no-parity", action="store_true", help="skip the comparison with HF transformers")
    p.set_defaults(run=run)


def _say(text: str = "") -> None:
    print(text, flush=True)


def run(args) -> int:
    t0 = time.perf_counter()
    model = args.model or DEFAULT_DIR
    if args.model is None and not os.path.exists(os.path.join(model, "config.json")):
        _say(f"synthesising a tiny random-weight model in {model} (first run only) ...")
        synthesize(model)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    opts = RunOptions(model=model, stages=args.stages, device=args.device, dtype=dtype, max_batch=4, max_len=2048,
                      quiet=True)
    handle = start_engine(opts)
    try:
        _say(f"\n== stage plan ({args.stages} stages, one process each)")
        for line in format_plan(handle.plan, os.path.basename(os.path.abspath(model))):
            _say(line)
        processor = Processor.from_pretrained(model, handle.cfg, MediaOptions(max_images=4))
        messages = _messages()
        _chat_through_server(handle, processor, messages, args)
        _say("\n== per-stage timings")
        for s in handle.engine.executor.stage_stats():
            _say(f"stage {s['stage']}: busy {s['busy_s'] * 1000:.0f} ms over {s['steps']} steps")
        inputs = processor.build_inputs(messages)
        ours = _greedy_tokens(handle.engine, inputs)
    finally:
        handle.close()
    if not args.no_parity:
        _parity(model, handle.cfg, inputs, ours, handle.eos_ids)
    _say(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0


def _messages() -> list[dict]:
    with open(sample_image_path(), "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]


def _chat_through_server(handle, processor, messages, args) -> None:
    from ..server.app import ServerSettings, create_app
    from ..server.background import ServerThread

    app = create_app(handle.engine, processor, ServerSettings(model_name="demo"))
    body = {"model": "demo", "stream": True, "temperature": 0, "max_tokens": args.max_new_tokens,
            "stream_options": {"include_usage": True}, "messages": messages}
    _say(f"\n== POST /v1/chat/completions (streaming): the sample image + {QUESTION!r}")
    _say("(the tiny model's weights are random: its words are noise; the plumbing is what is on show)")
    usage = _stream(ServerThread(app), body)
    _say(f"usage: {usage}")


def _stream(server, body: dict) -> dict:
    usage, mode = {}, None
    with server:
        req = urllib.request.Request(server.url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {})
                    for kind, text in (("thinking", delta.get("reasoning_content")), ("answer", delta.get("content"))):
                        if text:
                            if mode != kind:
                                print(f"\n[{kind}] ", end="")
                                mode = kind
                            print(text, end="", flush=True)
    _say()
    return usage


def _greedy_tokens(engine, inputs) -> list[int]:
    from ..engine.sampling import SamplingParams
    from ..engine.session import to_prompt

    seq = engine.add(to_prompt(inputs), SamplingParams(temperature=0.0, max_new_tokens=PARITY_TOKENS))
    engine.run_until_done()
    return seq.output


def _parity(model: str, cfg, inputs, ours: list[int], eos_ids: list[int]) -> None:
    """The same prompt, greedy, through HF transformers' Qwen3VLMoeForConditionalGeneration on the same weights."""
    _say("\n== parity with HF transformers (same checkpoint, same prompt, greedy)")
    if total_weight_bytes(cfg, "fp32") > 4e9:
        _say("skipped: the model is too big to load a second time in HF transformers here")
        return
    import torch
    from transformers import Qwen3VLMoeForConditionalGeneration

    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
    ids = torch.tensor([inputs.input_ids])
    kw = {"input_ids": ids, "mm_token_type_ids": torch.tensor([inputs.mm_token_type_ids])}
    if inputs.pixel_values is not None:
        kw.update(pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw)
    with torch.no_grad():
        pad = read_generation_config(model).get("pad_token_id")
        ref = hf.generate(**kw, max_new_tokens=len(ours), do_sample=False, eos_token_id=eos_ids,
                          pad_token_id=pad)[0, ids.shape[1]:].tolist()
    same = sum(a == b for a, b in zip(ours, ref))
    verdict = "IDENTICAL" if ours == ref else "DIFFERENT"
    _say(f"{same}/{len(ours)} generated tokens equal -> {verdict} to HF transformers "
         f"({len(inputs.input_ids)} prompt tokens, {len(ours)} new, 2-stage pipeline vs one HF process)")
