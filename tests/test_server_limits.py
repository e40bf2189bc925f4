"""Hostile input through a real client: whatever a client sends gets a 4xx naming what was wrong (never a 500), costly
requests are refused before the cost, deadlines and shutdowns end requests cleanly, and after each of these the
server still answers a good request. The server runs in a thread over a scripted engine (``test_server.py``), with
the tiny checkpoint's real processor."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from qwen_vl_distributed.engine import processor as processor_module
from qwen_vl_distributed.engine.engine import Engine
from qwen_vl_distributed.engine.media import MediaOptions
from qwen_vl_distributed.engine.processor import Processor
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.server import limits
from synth_model import tiny_model_dir
from test_server import (IM_END, MODEL, ScriptedExecutor, data_url, metric, png_bytes, scripted_engine, serve, user,
                         wait_for)

MAX_LEN = 256
LIMITS = MediaOptions(max_images=4, max_videos=2, max_media_bytes=8_000_000, max_image_pixels=64_000_000,
                      max_video_pixels=10**9, allowed_local_dirs=())


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return Processor.from_pretrained(tiny_model_dir(tmp_path_factory), preset("tiny"), LIMITS)


@pytest.fixture(scope="module")
def server(processor):
    """A scripted model that answers 'yes' and stops; a context of MAX_LEN tokens; the body limit derived."""
    engine = scripted_engine(processor.encode("yes") + [IM_END], max_len=MAX_LEN)
    with serve(engine, processor) as (srv, client):
        yield srv, client


def post(srv, body, headers=None, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(srv.url + "/v1/chat/completions", content=content,
                      headers={"content-type": "application/json", **(headers or {})}, timeout=60, **kw)


def good(srv) -> dict:
    r = post(srv, {"model": MODEL, "messages": user("hello"), "max_tokens": 4})
    assert r.status_code == 200, r.text
    return r.json()


def png(size: tuple[int, int]) -> bytes:
    """A one-colour RGB PNG, written row by row (the image is never held here): a few megabytes on the wire
    for a 13000 x 13000 image that is half a gigabyte decoded (zlib level 1: quick to write, a few MB)."""
    w, h = size

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row, parts = zlib.compressobj(1), b"\x00" + bytes((10, 200, 30)) * w, []
    for _ in range(h):
        parts.append(z.compress(row))
    parts.append(z.flush())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def body_of(messages, **kw) -> dict:
    return {"model": MODEL, "messages": messages, "max_tokens": 4, **kw}


BAD = '{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": %s}]}'
HOSTILE = {
    # name: (raw body, status, code, param)
    "50k-deep nesting": (b'{"model": "tiny", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400,
                         "invalid_json", None),
    "lone surrogate in text": ((BAD % '"a\\ud800b"').encode(), 400, "invalid_value", "messages"),
    "lone low surrogate in a part": ((BAD % '[{"type": "text", "text": "\\udc00"}]').encode(), 400,
                                     "invalid_value", "messages"),
    "lone surrogate in stop": (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                               b'"stop": "\\ud800"}', 400, "invalid_value", "stop"),
    "lone surrogate in a key": (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                                b'"\\ud800": 1}', 400, "invalid_value", None),
    "lone surrogate as the model": (b'{"model": "\\udfff", "messages": []}', 400, "invalid_value", "model"),
    "5000-digit integer": (b'{"model": "tiny", "messages": [], "max_tokens": ' + b"9" * 5000 + b"}", 400,
                           "invalid_json", None),
    "invalid utf-8": (b'{"model": "tiny", "messages": "\xff\xfe"}', 400, "invalid_json", None),
    "NaN temperature": (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                        b'"temperature": NaN}', 400, "invalid_value", "temperature"),
    "max_tokens beyond the context": (json.dumps(body_of(user("hi"), max_tokens=10**30)).encode(), 400,
                                      "context_length_exceeded", "max_tokens"),
    "max_completion_tokens beyond the context": (json.dumps(body_of(user("hi"), max_completion_tokens=MAX_LEN))
                                                 .encode(), 400, "context_length_exceeded", "max_completion_tokens"),
    "a PNG sent as a video": (json.dumps(body_of([{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": data_url(png_bytes(), "video/mp4")}}]}])).encode(), 400,
        "invalid_media", "messages[0].content[0].video_url"),
    "17 stop strings": (json.dumps(body_of(user("hi"), stop=[f"s{i}" for i in range(17)])).encode(), 400,
                        "invalid_value", "stop"),
    "a 10000-character stop string": (json.dumps(body_of(user("hi"), stop="x" * 10_000)).encode(), 400,
                                      "invalid_value", "stop"),
    "messages as an object": (b'{"model": "tiny", "messages": {"role": "user"}}', 400, "invalid_value", "messages"),
    "image_url as a number": ((BAD % '[{"type": "image_url", "image_url": 5}]').encode(), 400, "invalid_messages",
                              "messages[0].content[0].image_url"),
    "stream_options as a string": (json.dumps(body_of(user("hi"), stream=True, stream_options="x")).encode(), 400,
                                   "invalid_value", "stream_options"),
    "a JSON string": (b'"hello"', 400, "invalid_json", None),
    "an empty body": (b"", 400, "invalid_json", None),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_request_gets_a_4xx_and_the_server_serves_on(server, name):
    srv, _ = server
    raw, status, code, param = HOSTILE[name]
    r = post(srv, raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == (code, param), err
    assert good(srv)["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_that_the_prompt_leaves_no_room_for_names_max_tokens(server):
    srv, client = server
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=user("hello " * 20), max_tokens=MAX_LEN - 10)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    assert "new tokens do not fit after the prompt's" in e.value.message
    # with room for it, the same prompt is served
    r = client.chat.completions.create(model=MODEL, messages=user("hello " * 20), max_tokens=10)
    assert r.choices[0].finish_reason == "stop"


def _spy(monkeypatch, module, name: str) -> list:
    """Record the calls of module.name (still calling it)."""
    calls, real = [], getattr(module, name)

    def spy(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_a_huge_image_is_refused_from_its_header_without_decoding(server, monkeypatch):
    """A 13000 x 13000 PNG is 2 MB on the wire and half a gigabyte decoded: refused from its header."""
    srv, _ = server
    decoded = _spy(monkeypatch, processor_module, "load_image")
    bomb = png((13000, 13000))
    assert len(bomb) < 3_000_000
    r = post(srv, body_of(user("what is it", data_url(bomb))))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("media_limit_exceeded", "messages[0].content[0].image_url")
    assert "13000x13000 = 169000000 pixels; the limit is 64000000" in err["message"]
    # within the pixel limit but too many tokens for the context: refused from the header as well
    r = post(srv, body_of(user("what is it", data_url(png((2000, 2000))))))
    err = r.json()["error"]
    assert r.status_code == 400 and (err["code"], err["param"]) == ("context_length_exceeded",
                                                                     "messages[0].content[0].image_url"), err
    assert "with this image (2000x2000: 3844 tokens) the prompt is" in err["message"]
    assert decoded == []
    assert good(srv)


def test_a_long_text_is_refused_before_it_is_tokenised(server, processor, monkeypatch):
    srv, _ = server
    encoded = _spy(monkeypatch, processor, "encode")
    r = post(srv, body_of(user("word " * 2_000_000)))  # 10 MB
    err = r.json()["error"]
    assert r.status_code == 400 and (err["code"], err["param"]) == ("context_length_exceeded",
                                                                     "messages[0].content[0].text"), err
    assert "with 10000000 characters of text the prompt is at least" in err["message"]
    assert encoded == []
    assert good(srv)


def test_the_body_limit_is_what_a_request_can_carry(server, processor):
    srv, _ = server
    state = srv.server.engine  # (the Service holds the AsyncEngine)
    limit = limits.body_limit(LIMITS.max_media_bytes, MAX_LEN)
    assert limit < 20_000_000  # 8 MB of media as base64, text for the context, the JSON around it
    # an 800 MB body is refused from its headers, before any of it is read
    with socket.create_connection((srv.host, srv.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 800000000\r\n\r\n")
        answer = _read_response(s)
    assert answer.startswith("HTTP/1.1 413") and "body_too_large" in answer and str(limit) in answer
    assert state.alive and good(srv)


def _read_response(s: socket.socket) -> str:
    """One HTTP response (head and body) read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
            next(line.split(b":")[1] for line in data.split(b"\r\n") if line.lower().startswith(b"content-length"))):
        chunk = s.recv(65536)
        assert chunk, f"the connection closed mid-response: {data!r}"
        data += chunk
    return data.decode()


def test_a_client_gone_during_upload_is_no_server_error(server, caplog):
    srv, _ = server
    errors_before = metric(srv, 'qwen_vl_requests_total{status="500"}')
    with socket.create_connection((srv.host, srv.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000\r\n\r\n" + b'{"model": "tiny", "messages": [' + b" " * 5000)
    assert wait_for(lambda: metric(srv, 'qwen_vl_requests_total{status="499"}') >= 1, 30)
    assert metric(srv, 'qwen_vl_requests_total{status="500"}') == errors_before
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    # one that stops sending: the deadline (here the client's own) ends the wait for the rest of its body
    with socket.create_connection((srv.host, srv.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Timeout: 0.5\r\n"
                  b"Content-Length: 1000\r\n\r\n{")
        assert _read_response(s).startswith("HTTP/1.1 408")
    assert good(srv)


def test_a_full_server_answers_503_before_reading_a_body(processor):
    engine = Engine(preset("tiny"), ScriptedExecutor(processor.encode(" and so on"), step_s=0.01), 1, 10**6, [IM_END])
    with serve(engine, processor, max_queue=0) as (srv, client):
        held = client.chat.completions.create(model=MODEL, messages=user("go"), max_tokens=10**5, stream=True)
        next(iter(held))
        with socket.create_connection((srv.host, srv.port), timeout=30) as s:  # announces a body, sends none
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
            answer = _read_response(s)
        assert answer.startswith("HTTP/1.1 503") and "queue_full" in answer and "retry-after: 1" in answer.lower()
        held.close()
        assert wait_for(lambda: not engine.running, 30)
        assert post(srv, body_of(user("again"))).json()["choices"][0]["finish_reason"] == "length"


class Boom:
    """A processor whose work fails like a bug that quotes internals."""

    def __init__(self, real):
        self.real = real
        self.media = real.media

    def build_inputs(self, *a, **k):
        raise RuntimeError(f"pid {os.getpid()} on {socket.gethostname()} at {__file__}: <Thing object at 0x7f0011223344>"
                           " via 10.1.2.3:29500")

    def __getattr__(self, name):
        return getattr(self.real, name)


def _leaks(text: str) -> list[str]:
    found = [x for x in (str(os.getpid()), socket.gethostname(), os.path.dirname(__file__), "0x7f", "10.1.2.3",
                         "29500") if x in text]
    return found + ["a traceback"] * ("Traceback" in text)


def test_error_bodies_carry_a_request_id_and_no_internals(processor, caplog):
    engine = scripted_engine(processor.encode("yes") + [IM_END], max_len=MAX_LEN)
    with serve(engine, Boom(processor)) as (srv, _):
        r = post(srv, body_of(user("hi")))
        rid = r.headers["x-request-id"]
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert rid in r.json()["error"]["message"] and _leaks(r.text) == []
        assert any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records)  # the details: in the log
        # a client's own request id is kept
        assert post(srv, body_of(user("hi")), {"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
    with serve(scripted_engine([IM_END], max_len=MAX_LEN), processor) as (srv, _):
        r = post(srv, body_of(user("x", data_url(b"GIF89a not really"))))  # PIL quotes an object address
        assert r.status_code == 400 and r.headers["x-request-id"] and _leaks(r.text) == [], r.text


def test_docs_and_schema_need_the_api_key(processor):
    with serve(scripted_engine([IM_END]), processor, api_key="sk-x") as (srv, _):
        assert httpx.get(srv.url + "/openapi.json").status_code == 401
        assert httpx.get(srv.url + "/openapi.json", headers={"Authorization": "Bearer sk-x"}).status_code == 200
        assert httpx.get(srv.url + "/docs").status_code == 404
    with serve(scripted_engine([IM_END]), processor) as (srv, _), warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. FastAPI's "Duplicate Operation ID" for a route of two methods
        schema = httpx.get(srv.url + "/openapi.json").json()
        assert list(schema["paths"]["/health"]) == ["get"]
        head = httpx.head(srv.url + "/health")
        assert head.status_code == 200 and head.content == b""


def _sse_events(srv, body, headers=None) -> list:
    """The data of every event of a streamed request."""
    events = []
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**body, "stream": True},
                      headers=headers or {}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return events


def test_a_deadline_ends_the_request_and_frees_its_kv_blocks(processor):
    slow = Engine(preset("tiny"), ScriptedExecutor(processor.encode(" and so on"), step_s=0.01), 1, 10**6, [IM_END])
    with serve(slow, processor) as (srv, _):
        endless = {"model": MODEL, "messages": user("go"), "max_tokens": 10**5}
        r = post(srv, endless, {"X-Request-Timeout": "0.5"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert wait_for(lambda: not slow.running and slow.cache_stats().blocks_used == 0, 30)
        events = _sse_events(srv, endless, {"X-Request-Timeout": "0.5"})
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "deadline_exceeded"
        assert wait_for(lambda: not slow.running and slow.cache_stats().blocks_used == 0, 30)
        r = post(srv, endless, {"X-Request-Timeout": "soon"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Timeout"
        assert post(srv, {**endless, "max_tokens": 3}).json()["choices"][0]["finish_reason"] == "length"
    with serve(Engine(preset("tiny"), ScriptedExecutor(processor.encode(" and"), step_s=0.01), 1, 10**6, [IM_END]),
               processor, request_timeout_s=0.5) as (srv, _):  # the server's default deadline
        r = post(srv, {"model": MODEL, "messages": user("go"), "max_tokens": 10**5})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"


def test_drain_ends_queued_requests_lets_running_ones_finish_then_ends_the_rest(processor):
    """What SIGTERM does to `serve` (tests/test_serve_process.py sends the real signal): queued requests end at
    once, new ones get 503, running ones finish within the grace or are ended when it is over."""
    engine = Engine(preset("tiny"), ScriptedExecutor(processor.encode(" and so on"), step_s=0.02), 2, 10**6, [IM_END])
    app_settings = {"max_queue": 2}
    with serve(engine, processor, **app_settings) as (srv, client):
        srv.server.grace_s = 4.0
        results: dict = {}

        def run(name, max_tokens, stream=True):
            body = {"model": MODEL, "messages": user(name), "max_tokens": max_tokens}
            results[name] = _sse_events(srv, body) if stream else post(srv, body)

        short, endless = threading.Thread(target=run, args=("short", 40)), threading.Thread(
            target=run, args=("endless", 10**5))
        short.start()
        endless.start()
        assert wait_for(lambda: len(engine.running) == 2, 30)
        queued = [threading.Thread(target=run, args=("queued", 10)),
                  threading.Thread(target=run, args=("queued-plain", 10, False))]
        for t in queued:
            t.start()
        assert wait_for(lambda: len(engine.waiting) == 2, 30)
        srv.server.begin_drain()
        for t in queued:
            t.join(30)
        assert results["queued"][-2]["error"]["code"] == "shutting_down" and results["queued"][-1] == "[DONE]"
        assert results["queued-plain"].status_code == 503
        assert results["queued-plain"].json()["error"]["code"] == "shutting_down"
        r = post(srv, body_of(user("late")))
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        short.join(60)
        endless.join(60)
        assert results["short"][-2]["choices"][0]["finish_reason"] == "length"  # finished within the grace
        assert results["endless"][-2]["error"]["code"] == "shutting_down" and results["endless"][-1] == "[DONE]"
        assert wait_for(lambda: srv.stopped, 30)


def test_a_small_request_is_not_queued_behind_a_huge_ones_preprocessing(tmp_path_factory, capsys):
    """Four 36-megapixel images take seconds to decode and resize; a text request sent meanwhile is answered while
    they are still being preprocessed. Both latencies are printed (pytest -s shows them)."""
    hf = Processor.from_pretrained(tiny_model_dir(tmp_path_factory), preset("tiny"), LIMITS).hf
    hf.image_processor.size["longest_edge"] = 128 * 128  # a big image is shrunk to 16 tokens: four fit the context
    proc = Processor(hf, preset("tiny"), LIMITS)
    engine = scripted_engine(proc.encode("yes") + [IM_END], max_len=MAX_LEN)
    big = data_url(png((6000, 6000)))
    with serve(engine, proc) as (srv, _), ThreadPoolExecutor(1) as pool:
        t0 = time.perf_counter()
        huge = pool.submit(post, srv, body_of(user("describe them", big, big, big, big)))
        assert wait_for(lambda: metric(srv, "qwen_vl_preprocessing_requests") == 1, 60)
        t1 = time.perf_counter()
        small = post(srv, body_of(user("hi")))
        t_small = time.perf_counter() - t1
        still_preprocessing = metric(srv, "qwen_vl_preprocessing_requests") == 1 and not huge.done()
        r = huge.result(timeout=300)
        t_huge = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nsmall request: {t_small:.2f} s, sent while a 4 x 36-megapixel request was being preprocessed "
              f"(that one: {t_huge:.2f} s)")
    assert small.status_code == 200 and r.status_code == 200, r.text
    assert still_preprocessing
