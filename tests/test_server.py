"""The OpenAI-compatible server through a real client (the ``openai`` package) on loopback.

Two kinds of engine stand behind it: the real tiny model of a synthetic checkpoint, built by ``start_engine`` with
S = 1 and S = 2 stages (``ENGINE_BUILDERS``: add a way of running the model there and every ``real`` test covers it),
and a scripted executor whose "model" emits a fixed token sequence, for protocol behaviour a random model cannot
show (the reasoning split, stop strings) and for slow steps (disconnects, a full queue).
"""

from __future__ import annotations

import base64
import io
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch

from qwen_vl_distributed.cli.synth import synthesize
from qwen_vl_distributed.engine.build import EngineHandle, RunOptions, start_engine
from qwen_vl_distributed.engine.engine import Engine
from qwen_vl_distributed.engine.media import MediaOptions
from qwen_vl_distributed.engine.processor import Processor
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.server.background import wait_until
from qwen_vl_distributed.pipeline.payload import TokenPayload
from qwen_vl_distributed.server.app import ServerSettings, create_app
from qwen_vl_distributed.server.background import ServerThread

MODEL = "tiny"
KEY = "sk-test"
IM_END = 151645
THINK_END = 151668


# -- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A synthetic tiny checkpoint: random weights, Qwen-shaped tokenizer, chat template, processor configs."""
    return synthesize(str(tmp_path_factory.mktemp("tiny")), "tiny")


@pytest.fixture(scope="module")
def processor(model_dir):
    return Processor.from_pretrained(model_dir, preset("tiny"))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "red.png").write_bytes(png_bytes((200, 30, 30)))
    return d


def pipeline_engine(stages: int):
    def build(model_dir: str, slots: int, max_len: int) -> EngineHandle:
        return start_engine(RunOptions(model=model_dir, stages=stages, max_batch=slots, max_len=max_len, quiet=True))
    return build


# name -> builder(model_dir, slots, max_len) -> EngineHandle: the same tests run over each way of running the model.
ENGINE_BUILDERS = {"s1": pipeline_engine(1), "s2": pipeline_engine(2)}


@pytest.fixture(scope="module", params=sorted(ENGINE_BUILDERS))
def real(request, model_dir, processor, media_dir):
    """A server over the real tiny model: 8 slots, 512 tokens of context, local media allowed from media_dir."""
    handle = ENGINE_BUILDERS[request.param](model_dir, 8, 512)
    proc = Processor(processor.hf, preset("tiny"), MediaOptions(max_images=4, allowed_local_dirs=(str(media_dir),)))
    try:
        with serve(handle.engine, proc) as (server, client):
            yield server, client, handle.engine
    finally:
        handle.close()


class ScriptedExecutor:
    """Stands in for the model: every sequence emits ``script`` from its start (then repeats its last token).

    Same submit / collect interface as the real executors; ``step_s`` makes each step take that long."""

    num_stages = 1

    def __init__(self, script: list[int], step_s: float = 0.0):
        self.script, self.step_s = script, step_s
        self.pos: dict[int, int] = {}  # sequence id -> next script index
        self.done: deque[TokenPayload] = deque()
        self.steps = 0

    def submit(self, p) -> None:
        tokens = []
        for sid in p.seq_ids:
            i = 0 if sid in p.new_seqs else self.pos[sid]
            tokens.append(self.script[min(i, len(self.script) - 1)])
            self.pos[sid] = i + 1
        time.sleep(self.step_s)
        self.steps += 1
        self.done.append(TokenPayload("tokens", p.mb, torch.tensor(tokens)))

    def collect(self) -> TokenPayload:
        return self.done.popleft()

    def stage_stats(self) -> list[dict]:
        return [{"stage": 0, "busy_s": self.steps * self.step_s, "steps": self.steps}]

    def idle(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def scripted_engine(script: list[int], slots: int = 4, max_len: int = 256, step_s: float = 0.0, **kv) -> Engine:
    """``slots``: the most sequences running at once; ``kv``: the KV pool (num_blocks, block_size)."""
    return Engine(preset("tiny"), ScriptedExecutor(script, step_s), slots, max_len, [IM_END], **kv)


def thinking_script(processor) -> list[int]:
    """Decodes to 'Let me think about it.</think>\\n\\nThe answer is yes.' then <|im_end|>."""
    return (processor.encode("Let me think about it.") + [THINK_END] + processor.encode("\n\nThe answer is yes.")
            + [IM_END])


@contextmanager
def serve(engine: Engine, processor, **settings):
    app = create_app(engine, processor, ServerSettings(model_name=MODEL, **settings))
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=settings.get("api_key") or "none",
                               max_retries=0, timeout=30)
        yield server, client


def png_bytes(color=(0, 128, 255), size=(64, 64)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def user(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def _usage(u) -> tuple[dict, int]:
    """(usage without prompt_tokens_details, cached prompt tokens): how much of a prompt came from the KV cache
    depends on what ran before, so results are compared without it."""
    d = u.model_dump(exclude_none=True)
    return d, d.pop("prompt_tokens_details")["cached_tokens"]


def ask(client, messages, **kw):
    """Non-streaming and streaming results as comparable dicts (streamed deltas concatenated); the cached prompt
    tokens apart, in ``cached``."""
    r = client.chat.completions.create(model=MODEL, messages=messages, **kw)
    msg = r.choices[0].message
    usage, cached = _usage(r.usage)
    ask.cached = cached
    return {"reasoning": getattr(msg, "reasoning_content", None) or "", "content": msg.content or "",
            "finish_reason": r.choices[0].finish_reason, "usage": usage}


def ask_stream(client, messages, **kw):
    out = {"reasoning": "", "content": "", "finish_reason": None, "usage": None, "chunks": 0}
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        out["chunks"] += 1
        if chunk.usage is not None:
            out["usage"], ask_stream.cached = _usage(chunk.usage)
        for ch in chunk.choices:
            out["reasoning"] += getattr(ch.delta, "reasoning_content", None) or ""
            out["content"] += ch.delta.content or ""
            out["finish_reason"] = ch.finish_reason or out["finish_reason"]
    return out


def wait_for(cond, timeout: float = 5.0) -> bool:
    return wait_until(cond, timeout)


def metric(server, line_prefix: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix))


GREEDY = dict(temperature=0, max_tokens=12)


# -- the real tiny model -----------------------------------------------------------------------------------------


def test_stream_equals_non_stream(real):
    _, client, _ = real
    msgs = [{"role": "user", "content": "hello world, what is the answer"}]
    a = ask(client, msgs, **GREEDY)
    b = ask_stream(client, msgs, **GREEDY)
    assert b.pop("chunks") > 3
    assert a == b
    assert a["finish_reason"] == "length" and a["usage"]["completion_tokens"] == 12
    assert a["reasoning"]  # no </think> from a random model: all of it is reasoning


def test_concurrent_greedy_requests_equal_alone(real):
    server, client, engine = real
    prompts = [[{"role": "user", "content": f"describe the number {i} in one word"}] for i in range(10)]
    alone = [ask(client, m, **GREEDY) for m in prompts]
    steps_before = engine.executor.stage_stats()[0]["steps"]
    with ThreadPoolExecutor(len(prompts)) as pool:  # 10 requests, 8 slots: two wait in the queue
        together = list(pool.map(lambda m: ask(client, m, **GREEDY), prompts))
    assert together == alone
    # Batched: far fewer model steps than the 10 x 12 a one-at-a-time engine would need.
    assert engine.executor.stage_stats()[0]["steps"] - steps_before < 60


def test_seeded_sampling_repeats(real):
    _, client, _ = real
    msgs = [{"role": "user", "content": "tell me about water"}]
    kw = dict(temperature=0.9, top_p=0.9, seed=7, max_tokens=10, presence_penalty=0.5,
              extra_body={"top_k": 50, "repetition_penalty": 1.1})
    first, second = ask(client, msgs, **kw), ask(client, msgs, **kw)
    assert first == second
    streamed = ask_stream(client, msgs, **kw)
    streamed.pop("chunks")
    assert streamed == first


def test_image_input_data_url_and_local_file(real, media_dir):
    _, client, _ = real
    text_only = ask(client, user("what is in the picture"), **GREEDY)
    with_image = ask(client, user("what is in the picture", data_url(png_bytes())), **GREEDY)
    # A small square image (256 x 256 after resizing) is 16 x 16 patches merged 2 x 2: 64 placeholders + start/end.
    assert with_image["usage"]["prompt_tokens"] == text_only["usage"]["prompt_tokens"] + 66
    local = ask(client, user("what is in the picture", str(media_dir / "red.png")), **GREEDY)
    file_url = ask(client, user("what is in the picture", (media_dir / "red.png").as_uri()), **GREEDY)
    assert local == file_url and local["usage"] == with_image["usage"]
    streamed = ask_stream(client, user("what is in the picture", data_url(png_bytes())), **GREEDY)
    streamed.pop("chunks")
    assert streamed == with_image


def test_a_repeated_prompt_comes_from_the_cache_with_the_same_answer(real):
    server, client, _ = real
    msgs = [{"role": "user", "content": " ".join(f"word{i}" for i in range(40))}]
    first = ask(client, msgs, temperature=0, max_tokens=4)
    before = metric(server, "vllm:prefix_cache_hits_total")
    again = ask(client, msgs, temperature=0, max_tokens=4)
    # the prefix cache holds the first request's whole blocks (16 tokens each); the last token is always computed
    assert ask.cached == (again["usage"]["prompt_tokens"] - 1) // 16 * 16 > 0 and again == first
    assert wait_for(lambda: metric(server, "vllm:prefix_cache_hits_total") == before + ask.cached)
    assert metric(server, "qwen_vl_prefix_cache_hit_rate") > 0


def test_a_request_that_needs_more_kv_than_the_cache_holds_is_refused_with_400(processor):
    engine = scripted_engine(processor.encode(" and so on"), slots=2, max_len=4096, num_blocks=4, block_size=16)
    with serve(engine, processor) as (server, client):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=user("go"), max_tokens=100)
        assert e.value.status_code == 400 and "the KV cache holds 64" in str(e.value)
        assert e.value.code == "context_length_exceeded"
        assert ask(client, user("go"), max_tokens=5)["usage"]["completion_tokens"] == 5  # one that fits runs


def test_models_health_metrics(real):
    server, client, _ = real
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ask(client, [{"role": "user", "content": "hello"}], **GREEDY)
    text = httpx.get(server.url + "/metrics").text
    for name in ('qwen_vl_requests_total{status="200"}', 'vllm:prompt_tokens_total{model_name="tiny"}',
                 'vllm:generation_tokens_total{model_name="tiny"}', "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
                 'vllm:request_success_total{finished_reason="length",model_name="tiny"}',
                 'qwen_vl_stage_busy_seconds_total{stage="0"}', 'vllm:num_requests_waiting{model_name="tiny"}',
                 'vllm:num_requests_running{model_name="tiny"}', 'vllm:kv_cache_usage_perc{model_name="tiny"}',
                 'vllm:prefix_cache_queries_total{model_name="tiny"}',
                 'vllm:prefix_cache_hits_total{model_name="tiny"}', 'vllm:num_preemptions_total{model_name="tiny"}',
                 "qwen_vl_prefix_cache_hit_rate"):
        assert name in text, name
    # every admission looks its tokens up in the prefix cache (engine-side, published a moment later)
    assert wait_for(lambda: metric(server, "vllm:prefix_cache_queries_total")
                    >= metric(server, "vllm:prompt_tokens_total") > 0)
    assert metric(server, "vllm:generation_tokens_total") >= 12
    assert metric(server, "vllm:time_to_first_token_seconds_count") >= 1
    assert metric(server, "qwen_vl_stage_busy_seconds_total") > 0


# -- protocol behaviour with a scripted model --------------------------------------------------------------------


@pytest.fixture
def scripted(processor):
    engine = scripted_engine(thinking_script(processor))
    with serve(engine, processor) as (server, client):
        yield server, client, engine


def test_reasoning_split(scripted, processor):
    _, client, _ = scripted
    msgs = [{"role": "user", "content": "is it?"}]
    a = ask(client, msgs, max_tokens=50)
    assert (a["reasoning"], a["content"], a["finish_reason"]) == ("Let me think about it.", "The answer is yes.",
                                                                  "stop")
    b = ask_stream(client, msgs, max_tokens=50)
    b.pop("chunks")
    assert a == b
    assert a["usage"]["completion_tokens"] == len(thinking_script(processor))


def test_stop_string_is_not_returned_and_frees_the_slot(scripted):
    _, client, engine = scripted
    msgs = [{"role": "user", "content": "is it?"}]
    a = ask(client, msgs, max_tokens=50, stop=["answer"])
    assert (a["reasoning"], a["content"], a["finish_reason"]) == ("Let me think about it.", "The ", "stop")
    b = ask_stream(client, msgs, max_tokens=50, stop="answer")
    b.pop("chunks")
    assert a == b
    # A stop inside the reasoning ends the reasoning there, with no content.
    c = ask(client, msgs, max_tokens=50, stop=["think"])
    assert (c["reasoning"], c["content"], c["finish_reason"]) == ("Let me ", "", "stop")
    assert wait_for(lambda: not engine.running and engine.pool.num_used == 0)


def test_length_cut_inside_reasoning(scripted):
    _, client, _ = scripted
    a = ask(client, [{"role": "user", "content": "is it?"}], max_tokens=3)
    assert a["finish_reason"] == "length" and a["content"] == "" and a["reasoning"]
    assert a["usage"]["completion_tokens"] == 3


def test_client_disconnect_frees_its_slot(processor):
    engine = scripted_engine(processor.encode(" and so on"), slots=1, max_len=10**6, step_s=0.01)
    with serve(engine, processor) as (server, client):
        stream = client.chat.completions.create(model=MODEL, messages=user("go"), max_tokens=10**5, stream=True)
        next(iter(stream))
        next(iter(stream))
        assert len(engine.running) == 1
        stream.close()  # hang up mid-stream
        assert wait_for(lambda: not engine.running and engine.pool.num_used == 0)
        # Non-streaming: the client gives up waiting.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", timeout=0.3,
                       json={"model": MODEL, "messages": user("go"), "max_tokens": 10**5})
        assert wait_for(lambda: not engine.running and engine.pool.num_used == 0)
        assert metric(server, 'vllm:request_success_total{finished_reason="abort",model_name="tiny"}') == 2
        # The one slot serves the next request at once.
        assert ask(client, user("again"), max_tokens=3)["usage"]["completion_tokens"] == 3


def test_full_queue_answers_503_with_retry_after(processor):
    engine = scripted_engine(processor.encode(" and so on"), slots=1, max_len=10**6, step_s=0.01)
    with serve(engine, processor, max_queue=1) as (server, client):
        held = [client.chat.completions.create(model=MODEL, messages=user("go"), max_tokens=10**5, stream=True)
                for _ in range(2)]  # one running, one waiting for the slot
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model=MODEL, messages=user("go"), max_tokens=3)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        assert e.value.code == "queue_full"
        assert wait_for(lambda: metric(server, "vllm:num_requests_waiting") == 1)
        for s in held:
            s.close()
        assert wait_for(lambda: not engine.running and not engine.waiting)
        assert ask(client, user("again"), max_tokens=3)["finish_reason"] == "length"


# -- bad requests: the matching 4xx, and the server keeps serving ------------------------------------------------


@pytest.fixture(scope="module")
def strict(processor, media_dir):
    """API key, 1 image per request, 96 tokens of context, local media only from media_dir."""
    proc = Processor(processor.hf, preset("tiny"), MediaOptions(max_images=1, allowed_local_dirs=(str(media_dir),)))
    engine = scripted_engine(processor.encode("yes") + [IM_END], max_len=96)
    with serve(engine, proc, api_key=KEY, max_body_bytes=64 * 1024) as (server, client):
        yield server, client


BAD_REQUESTS = {
    # name: (request changes, status, code, param)
    "unknown model": ({"model": "gpt-4"}, 404, "model_not_found", "model"),
    "bad base64": ({"messages": user("x", "data:image/png;base64,@@@not-base64@@@")}, 400, "invalid_media_url",
                   "messages[0].content[0].image_url"),
    "undecodable image": ({"messages": user("x", data_url(b"this is not a png at all"))}, 400, "invalid_media",
                          "messages[0].content[0].image_url"),
    "too many images": ({"messages": user("x", data_url(png_bytes()), data_url(png_bytes()))}, 400,
                        "media_limit_exceeded", "messages"),
    "disallowed local path": ({"messages": user("x", "/etc/hostname")}, 400, "media_access_denied",
                              "messages[0].content[0].image_url"),
    "prompt longer than the context": ({"messages": user("hello " * 200)}, 400, "context_length_exceeded",
                                       "messages"),
    "bad temperature": ({"temperature": -1}, 400, "invalid_value", "temperature"),
    "wrong type": ({"max_tokens": "many"}, 400, "invalid_value", "max_tokens"),
    "bad messages": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_messages",
                     "messages[0].role"),
    "missing messages": ({"messages": None}, 400, "invalid_value", "messages"),
    "n < 1": ({"n": 0}, 400, "invalid_value", "n"),
    "unknown field": ({"frobnicate": True}, 400, "invalid_value", "frobnicate"),
    "max_tokens past the context": ({"max_tokens": 10**9}, 400, "context_length_exceeded", "max_tokens"),
    "zero max_tokens": ({"max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    "bad stop": ({"stop": ["ok", 3]}, 400, "invalid_value", "stop"),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_request(strict, name):
    server, client = strict
    change, status, code, param = BAD_REQUESTS[name]
    body = {"model": MODEL, "messages": user("hello"), "max_tokens": 2} | change
    body = {k: v for k, v in body.items() if v is not None}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == (code, param), err
    assert err["type"] == "invalid_request_error" and err["message"]
    # ... and the same through the openai client (its exception classes per status)
    kw = {k: v for k, v in body.items() if k not in ("model", "messages", "max_tokens", "temperature", "n")}
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=body["model"], messages=body.get("messages", []),
                                       max_tokens=body["max_tokens"], temperature=body.get("temperature"),
                                       n=body.get("n"), extra_body=kw or None)
    assert e.value.status_code == status


def test_bad_json_and_auth(strict):
    server, client = strict
    url = server.url + "/v1/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url, content=b'{"model": "tiny", "messages": [', headers=auth | {"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, content=b"[1, 2]", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url, json={"model": MODEL, "messages": user("hi")}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=user("hi"))
    r = httpx.get(server.url + "/v1/nowhere", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.post(url, json={"model": MODEL, "messages": user("x" * 100_000)}, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    # /health and /metrics need no key; the server still serves after all of the above.
    assert httpx.get(server.url + "/health").status_code == 200
    assert metric(server, 'qwen_vl_requests_total{status="401"}') >= 3
    r = client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=5)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.reasoning_content == "yes"


def test_allowed_local_file_is_served(strict, media_dir):
    _, client = strict
    r = client.chat.completions.create(model=MODEL, messages=user("x", str(media_dir / "red.png")), max_tokens=2)
    assert r.usage.prompt_tokens > 66
    with pytest.raises(openai.BadRequestError) as e:  # inside the folder by name, outside once resolved
        client.chat.completions.create(model=MODEL, messages=user("x", str(media_dir / ".." / "etc")), max_tokens=2)
    assert e.value.code == "media_access_denied"


class BrokenExecutor(ScriptedExecutor):
    def submit(self, p) -> None:
        raise RuntimeError("stage 1 on host-b died")


def test_engine_failure_is_reported_not_hung(processor, caplog):
    engine = Engine(preset("tiny"), BrokenExecutor([IM_END]), 2, 128, [IM_END])
    app = create_app(engine, processor, ServerSettings(model_name=MODEL))
    with ServerThread(app, stop_on_engine_failure=False) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=3)
        rid = e.value.response.headers["x-request-id"]
        assert e.value.status_code == 500 and e.value.code == "engine_failure" and rid in e.value.message
        # the engine's own words (which stage, which host) are for the server log, under the request's id
        assert "host-b" not in e.value.response.text
        assert any(rid in r.getMessage() and "stage 1 on host-b died" in r.getMessage() for r in caplog.records)
        assert httpx.get(server.url + "/health").status_code == 503
        with pytest.raises(openai.InternalServerError) as e:  # no engine: refused at once
            client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=3)
        assert e.value.status_code == 503 and e.value.code == "engine_stopped"
    # serve's own rule: the server stops (and `serve` exits non-zero: tests/test_serve_process.py)
    engine = Engine(preset("tiny"), BrokenExecutor([IM_END]), 2, 128, [IM_END])
    with serve(engine, processor) as (server, client):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=3)
        assert wait_for(lambda: server.stopped, 30) and "RuntimeError" in server.server.failure
