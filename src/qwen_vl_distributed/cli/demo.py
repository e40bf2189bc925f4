"""``qwen-vl demo``: the whole system on the embedded default, on a fresh machine.

Synthesises a tiny random model on first run (.demo/tiny-model), starts a 2-stage pipeline as 2 processes, serves it
on loopback, sends one multimodal chat request (the sample image shipped in the package) through the
OpenAI-compatible API, streams the reasoning and the answer, then prints the stage plan, per-stage timings and a
parity check of the same prompt against HF transformers. Point ``--model`` at a real checkpoint (a directory or a
hub repo id) to run that instead (``--stages`` and ``--device cuda`` as needed).

The parity verdict is given only when transformers read every tensor of the same files: it is skipped, with the
reason in one line, for models too big to load twice, checkpoints transformers cannot load (a missing package, an
error), load reports with missing, unexpected or mismatched tensors, and layouts transformers would misread
(``checkpoint.inspect.transformers_misreads``).
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.request

from ..checkpoint.hub import ModelSource
from ..checkpoint.index import open_checkpoint
from ..checkpoint.inspect import transformers_misreads
from ..engine.build import RunOptions, read_generation_config, start_engine
from ..engine.media import MediaOptions, sample_image_path
from ..engine.processor import Processor
from ..errors import UserError
from ..model.param_counts import total_weight_bytes
from .options import add_model_args, model_source
from .plan import format_plan
from .synth import synthesize

DEFAULT_DIR = os.path.join(".demo", "tiny-model")
QUESTION = "What is in this picture? Answer in one sentence."
PARITY_TOKENS = 24
REFERENCE_LIMIT_BYTES = 4e9  # fp32 weights transformers may load beside the pipeline for the verdict


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole system on a tiny synthetic model (or --model DIR)")
    add_model_args(p, required=False)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--no-parity", action="store_true", help="skip the comparison with HF transformers")
    p.set_defaults(run=run)


def _say(text: str = "") -> None:
    print(text, flush=True)


def run(args) -> int:
    t0 = time.perf_counter()
    source = _source(args)
    model = source.path
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    opts = RunOptions(model=model, revision=source.revision, stages=args.stages, device=args.device, dtype=dtype,
                      max_batch=4, max_len=2048, quiet=True)
    handle = start_engine(opts)
    try:
        _say(f"\n== stage plan ({args.stages} stages, one process each)")
        for line in format_plan(handle.plan, source.name):
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
        _parity(model, inputs, ours, handle.eos_ids, f"{args.stages}-stage pipeline ({dtype}, {args.device})")
    _say(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0


def _source(args) -> ModelSource:
    if args.model is not None:
        return model_source(args)
    if args.revision is not None or args.download:
        raise UserError("--revision and --download go with --model")
    if not os.path.exists(os.path.join(DEFAULT_DIR, "config.json")):
        _say(f"synthesising a tiny random-weight model in {DEFAULT_DIR} (first run only) ...")
        synthesize(DEFAULT_DIR)
    return ModelSource(DEFAULT_DIR)


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


def _parity(model: str, inputs, ours: list[int], eos_ids: list[int], what: str) -> None:
    """The same prompt, greedy, through HF transformers' Qwen3VLMoeForConditionalGeneration on the same files."""
    import torch

    _say("\n== parity with HF transformers (same checkpoint, same prompt, greedy)")
    hf, why_not = reference_model(model)
    if hf is None:
        _say(f"skipped, no verdict: {why_not}")
        return
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
         f"({len(inputs.input_ids)} prompt tokens, {len(ours)} new, {what} vs one HF process (float32, cpu))")


def reference_model(model: str):
    """(transformers' model of the checkpoint in ``model``, None), or (None, why there is no reference): a verdict
    needs transformers to have read every tensor of these files, as stored."""
    ckpt = open_checkpoint(model)
    if total_weight_bytes(ckpt.cfg, "fp32") > REFERENCE_LIMIT_BYTES:
        return None, "the model is too big to load a second time in HF transformers here"
    misread = transformers_misreads(ckpt)
    if misread:
        return None, misread
    import torch
    from transformers import Qwen3VLMoeForConditionalGeneration
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report table: summed up below in one line
    try:
        hf, report = Qwen3VLMoeForConditionalGeneration.from_pretrained(model, dtype=torch.float32,
                                                                        output_loading_info=True)
    except Exception as e:  # noqa: BLE001 -- a missing package (accelerate for fp8), an unreadable layout, ...
        first = str(e).splitlines()[0] if str(e) else ""
        return None, f"transformers cannot load {model} ({type(e).__name__}: {first})"
    finally:
        hf_logging.set_verbosity(level)
    unused = _unused_tensors(report)
    if unused:
        return None, f"transformers did not use every tensor of {model} ({unused})"
    return hf.eval(), None


def _unused_tensors(report: dict) -> str:
    """transformers' load report in a few words: '' when every tensor was used as stored."""
    parts = []
    for key, what in (("missing_keys", "missing (left at random)"), ("unexpected_keys", "unexpected (ignored)"),
                      ("mismatched_keys", "of another shape"), ("error_msgs", "errors")):
        items = sorted(str(k) for k in report.get(key) or ())
        if items:
            parts.append(f"{len(items)} {what}, e.g. {items[0]}")
    return "; ".join(parts)
