"""The OpenAI API as vLLM clients and agent frameworks use it, through the official ``openai`` client against a
2-stage server on the tiny model (random weights): tool calls and JSON schemas that only constrained decoding can
produce, log-probabilities equal to HF's, n choices, completions, token routes, metrics. Protocol behaviour a random
model cannot show (parsing a tool call the model chose to make, an Instruct template) runs on a scripted engine.

The tiny model speaks through the Thinking template: its generation prompt opens a think block, which random weights
never close, so the tests that need an answer bias ``</think>`` up with logit_bias (a real model closes it itself).
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from qwen_vl_distributed.checkpoint.synth_processor import write_processor_files
from qwen_vl_distributed.engine.processor import Processor
from qwen_vl_distributed.model.config import preset
from synth_model import tiny_model_dir
from test_server import IM_END, MODEL, THINK_END, pipeline_engine, scripted_engine, serve, user

CLOSE_THINK = {str(THINK_END): 100}  # the random model ends its reasoning at once
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "local"]}}, "required": ["zone"]}}}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "member": {"type": "boolean"}},
          "required": ["name", "age", "member"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def processor(model_dir):
    return Processor.from_pretrained(model_dir, preset("tiny"))


@pytest.fixture(scope="module")
def api(model_dir, processor):
    """A 2-stage pipeline behind the server: 6 slots, 2048 tokens of context (the tools' system prompt is long in
    the tiny vocabulary, which spells most words byte by byte)."""
    handle = pipeline_engine(2)(model_dir, 6, 2048)
    try:
        with serve(handle.engine, processor) as (server, client):
            yield server, client
    finally:
        handle.close()


def chat(client, **kw):
    kw.setdefault("messages", [{"role": "user", "content": "What is the weather in Paris?"}])
    return client.chat.completions.create(model=MODEL, **kw)


def check_weather_args(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and len(args["city"]) <= 12
    assert args["unit"] in ("celsius", "fahrenheit")


def stream_calls(client, **kw) -> tuple[dict, list[dict], str]:
    """Streamed tool calls accumulated as clients do (by index: id, name, then argument pieces)."""
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in chat(client, stream=True, **kw):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            finish = ch.finish_reason or finish
            for tc in ch.delta.tool_calls or []:
                c = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                c["id"] = tc.id or c["id"]
                c["name"] += tc.function.name or ""
                c["arguments"] += tc.function.arguments or ""
    return calls, [calls[i] for i in sorted(calls)], finish or content


# -- constrained decoding under random weights ---------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_call_is_valid_under_random_weights(api, parallel):
    _, client = api
    r = chat(client, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=parallel, max_tokens=300,
             temperature=0, logit_bias=CLOSE_THINK)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and (parallel or len(calls) == 1)
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        assert c.function.name in ("get_weather", "get_time")
        if c.function.name == "get_weather":
            check_weather_args(c.function.arguments)
        else:
            assert json.loads(c.function.arguments)["zone"] in ("utc", "local")
    _, streamed, finish = stream_calls(client, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=parallel, max_tokens=300, temperature=0,
                                       logit_bias=CLOSE_THINK)
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed] == [(c.function.name, c.function.arguments) for c in calls]


def test_named_tool_choice_calls_that_function_once(api):
    _, client = api
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = chat(client, tools=[WEATHER, TIME], tool_choice=named, max_tokens=300, temperature=0.7, seed=5,
             logit_bias=CLOSE_THINK)
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather"]
    check_weather_args(calls[0].function.arguments)


def test_the_grammar_starts_after_the_reasoning(api):
    """Without the bias the random model never closes its think block: all of the output is reasoning and no call
    is forced into it."""
    _, client = api
    r = chat(client, tools=[WEATHER], tool_choice="required", max_tokens=8, temperature=0)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "length" and not msg.tool_calls and msg.reasoning_content
    assert msg.reasoning == msg.reasoning_content


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_is_met_under_random_weights(api, stream):
    _, client = api
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    kw = dict(response_format=fmt, max_tokens=200, temperature=1.0, seed=11, logit_bias=CLOSE_THINK)
    if stream:
        text = "".join(ch.delta.content or "" for chunk in chat(client, stream=True, **kw) for ch in chunk.choices)
    else:
        r = chat(client, **kw)
        assert r.choices[0].finish_reason == "stop"
        text = r.choices[0].message.content
    value = json.loads(text)
    assert set(value) == {"name", "age", "member"} and 0 <= value["age"] <= 120
    assert isinstance(value["member"], bool) and len(value["name"]) <= 10
    obj = chat(client, response_format={"type": "json_object"}, max_tokens=200, temperature=0,
               logit_bias=CLOSE_THINK)
    # any JSON object; a random model may not close it within max_tokens, but what it wrote is a JSON prefix
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:
        assert obj.choices[0].message.content.startswith("{")


def test_vllm_structured_outputs(api):
    _, client = api
    r = chat(client, max_tokens=20, temperature=1.0, seed=3, logit_bias=CLOSE_THINK,
             extra_body={"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}})
    assert r.choices[0].message.content in ("alpha", "beta", "gamma")
    r = chat(client, max_tokens=20, temperature=1.0, seed=3, logit_bias=CLOSE_THINK,
             extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}})
    content = r.choices[0].message.content
    assert len(content) == 6 and content[:3].isdigit() and content[3] == "-" and content[4:].isalpha()


# -- sampling and outputs --------------------------------------------------------------------------------------------


def test_logprobs_equal_hf_log_softmax(api, model_dir, processor):
    """Each generated token's log-probability and top-5 equal a log-softmax of HF transformers' logits for the same
    prompt and tokens (fp32, 1e-4); greedy, so the tokens are HF's greedy tokens too."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    from qwen_vl_distributed.server.logprobs import TokenText

    _, client = api
    msgs = [{"role": "user", "content": "hello world, the answer is"}]
    r = chat(client, messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=5)
    got = r.choices[0].logprobs.content
    assert len(got) == r.usage.completion_tokens == 6
    prompt = torch.tensor([processor.build_inputs(msgs).input_ids])
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = hf.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, eos_token_id=[])[0]
        logits = hf(input_ids=ids[None, :-1]).logits[0, prompt.shape[1] - 1:]
    ref = torch.log_softmax(logits.float(), dim=-1)
    text = TokenText(processor.tokenizer).text
    for k, e in enumerate(got):
        token = ids[prompt.shape[1] + k].item()
        assert e.token == text(token) and bytes(e.bytes).decode(errors="replace") == e.token
        assert e.logprob == pytest.approx(ref[k, token].item(), abs=1e-4)
        top_lp, top_ids = ref[k].topk(5)
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(top_lp.tolist(), abs=1e-4)
        assert [t.token for t in e.top_logprobs] == [text(t) for t in top_ids.tolist()]


def test_n_choices_with_seeds(api):
    _, client = api
    kw = dict(max_tokens=6, temperature=1.0, seed=21, n=3)
    r = chat(client, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = chat(client, **kw)
    assert [c.message for c in again.choices] == [c.message for c in r.choices]
    texts = [c.message.reasoning_content for c in r.choices]
    assert len(set(texts)) > 1  # each choice draws with its own seed
    one = chat(client, max_tokens=6, temperature=1.0, seed=22)  # choice 1 draws with seed + 1
    assert one.choices[0].message == r.choices[1].message
    assert r.usage.completion_tokens == 18 and r.usage.prompt_tokens == one.usage.prompt_tokens
    streamed = {i: "" for i in range(3)}
    for chunk in chat(client, stream=True, **kw):
        for ch in chunk.choices:
            streamed[ch.index] += getattr(ch.delta, "reasoning_content", None) or ""
    assert [streamed[i] for i in range(3)] == texts


def test_logit_bias_min_p_stop_and_special_tokens(api, processor):
    _, client = api
    target = processor.encode(" water")[0]
    r = chat(client, max_tokens=4, temperature=0.9, seed=1, logit_bias={str(target): 100},
             extra_body={"min_p": 0.05})
    assert r.choices[0].message.reasoning_content == " water" * 4
    r = chat(client, max_tokens=4, temperature=0, logit_bias={str(IM_END): 100}, logprobs=True,
             extra_body={"skip_special_tokens": False, "include_stop_str_in_output": True})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    r = chat(client, max_tokens=3, temperature=0, logit_bias={str(IM_END): 100},
             extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = chat(client, max_tokens=5, temperature=0, logit_bias={str(IM_END): 100}, extra_body={"min_tokens": 2})
    assert r.usage.completion_tokens == 3


def test_max_tokens_absent_is_the_rest_of_the_context(processor):
    engine = scripted_engine(processor.encode(" and so on"), max_len=60)
    with serve(engine, processor) as (server, client):
        r = chat(client)
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens + r.usage.completion_tokens == 60
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, max_tokens=1000)
        assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
        assert "at most" in e.value.message


# -- tool calls the model chose to make; Instruct template; tool messages (scripted model) -------------------------


def test_auto_tool_calls_are_parsed(processor):
    said = processor.encode("Checking.") + [THINK_END] + processor.encode(
        '\n\nLet me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'
        '\n</tool_call>') + [IM_END]
    engine = scripted_engine(said, max_len=2048)
    with serve(engine, processor) as (_, client):
        r = chat(client, tools=[WEATHER], max_tokens=100)
        msg = r.choices[0].message
        assert (msg.reasoning_content, msg.content, r.choices[0].finish_reason) == ("Checking.", "Let me look.",
                                                                                    "tool_calls")
        assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
            ("get_weather", {"city": "Oslo", "unit": "celsius"})]
        _, calls, finish = stream_calls(client, tools=[WEATHER], max_tokens=100)
        assert finish == "tool_calls" and [(c["name"], c["arguments"]) for c in calls] == [
            (t.function.name, t.function.arguments) for t in msg.tool_calls]
        none = chat(client, tools=[WEATHER], tool_choice="none", max_tokens=100)
        assert none.choices[0].message.tool_calls is None and "<tool_call>" in none.choices[0].message.content
        # the conversation goes on: the call (content null) and its result are accepted and rendered
        follow = [{"role": "user", "content": "weather?"},
                  {"role": "assistant", "content": None, "tool_calls": [t.model_dump() for t in msg.tool_calls]},
                  {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "12 degrees"}]
        assert chat(client, messages=follow, tools=[WEATHER], max_tokens=100).choices[0].message.tool_calls


def test_an_instruct_template_answers_in_content(processor, tmp_path):
    """No think block opened by the prompt: the whole output is the answer, even text after a </think>."""
    import shutil

    d = tmp_path / "instruct"
    shutil.copytree(processor.hf.tokenizer.name_or_path, d, ignore=shutil.ignore_patterns("*.safetensors*"))
    write_processor_files(d, chat_template="instruct")  # what `qwen-vl synth --chat-template instruct` writes
    proc = Processor.from_pretrained(d, preset("tiny"))
    engine = scripted_engine(processor.encode("All answer.") + [IM_END])
    with serve(engine, proc) as (_, client):
        r = chat(client, max_tokens=20)
        assert (r.choices[0].message.content, r.choices[0].message.reasoning_content) == ("All answer.", None)


# -- completions, token routes, models, health, metrics -------------------------------------------------------------


def test_completions(api, processor):
    server, client = api
    a = client.completions.create(model=MODEL, prompt="the water of the world", max_tokens=5, temperature=0,
                                  logprobs=2, echo=True)
    ids = processor.encode("the water of the world")
    b = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert a.choices[0].text == "the water of the world" + b.choices[0].text
    lp = a.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == len("the water of the world")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=ids, max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == b.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=2, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3] and batch.usage.completion_tokens == 8
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[151655], max_tokens=2)
    assert e.value.param == "prompt"


def test_tokenize_detokenize_models_health(api, processor):
    server, client = api
    msgs = [{"role": "user", "content": "hello"}]
    tok = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": msgs}).json()
    assert tok["tokens"] == processor.build_inputs(msgs).input_ids and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == 2048
    plain = httpx.post(server.url + "/tokenize", json={"prompt": "hello world", "return_token_strs": True}).json()
    assert plain["tokens"] == processor.encode("hello world") and "".join(plain["token_strs"]) == "hello world"
    back = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": tok["tokens"]}).json()
    assert back["prompt"].startswith("<|im_start|>user\nhello<|im_end|>")
    assert httpx.post(server.url + "/detokenize", json={"tokens": [10**7]}).status_code == 400
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x", "extra": 1}).status_code == 400
    from test_server import data_url, png_bytes

    image = user("what is it", data_url(png_bytes()))
    with_ids = [httpx.post(server.url + "/tokenize", json={"messages": image, "chat_template_kwargs": kw}).json()
                for kw in ({}, {"add_vision_id": True})]  # the template numbers the pictures when asked
    assert with_ids[1]["count"] == with_ids[0]["count"] + len(processor.encode("Picture 1: "))
    kw = httpx.post(server.url + "/tokenize", json={"messages": msgs, "chat_template_kwargs": {"tokenize": True}})
    assert kw.status_code == 400 and kw.json()["error"]["param"] == "chat_template_kwargs.tokenize"
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.model_extra["max_model_len"] == 2048
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    assert httpx.head(server.url + "/health").status_code == 200


def test_unknown_and_unsupported_fields_are_refused(api):
    server, client = api
    for extra in ({"guided_json": {}}, {"reasoning_effort": "high"}, {"functions": []},
                  {"stream_options": {"include_usage": True, "other": 1}}):
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, max_tokens=2, extra_body=extra)
        assert e.value.param == next(iter(extra))
    for bad, param in (({"top_logprobs": 3}, "top_logprobs"), ({"logit_bias": {"-5": 1}}, "logit_bias"),
                       ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                    "schema": {"type": "nope"}}}},
                        "response_format"),
                       ({"tools": [WEATHER], "tool_choice": "required",
                         "response_format": {"type": "json_object"}}, "response_format"),
                       ({"n": 1000}, "n")):
        r = httpx.post(server.url + "/v1/chat/completions",
                       json={"model": MODEL, "messages": user("x"), "max_tokens": 2, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
