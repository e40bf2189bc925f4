"""Tool calls: parsing hermes-style calls out of streamed text, and what tool_choice asks of the grammar."""

from __future__ import annotations

import json
import random

import pytest

from qwen_vl_distributed.server.errors import APIError
from qwen_vl_distributed.server.protocol import ChatCompletionRequest
from qwen_vl_distributed.server.tools import ToolCallParser, plan_tools

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


def parse(text: str, cut: list[int] | None = None):
    """(content, [(name, arguments dict)]) from text fed in pieces cut at ``cut``."""
    p = ToolCallParser()
    bounds = [0] + (cut or []) + [len(text)]
    content, calls = "", []
    for a, b in zip(bounds, bounds[1:]):
        out = p.feed(text[a:b])
        content, calls = content + out.content, calls + out.calls
    out = p.finish()
    content, calls = content + out.content, calls + out.calls
    return content, [(c.function.name, json.loads(c.function.arguments)) for c in calls], [c.id for c in calls]


@pytest.mark.parametrize("text, content, names", [
    (CALL, "", ["get_weather"]),
    ("Let me check.\n\n" + CALL + "\n" + CALL2, "Let me check.", ["get_weather", "get_time"]),
    ("no tools here <tool but not a call", "no tools here <tool but not a call", []),
    ("<tool_call>\nnot json\n</tool_call> after", "<tool_call>\nnot json\n</tool_call> after", []),
    (CALL[: -len("</tool_call>")], "", ["get_weather"]),  # cut before its close tag, but complete JSON
    ("text\n<tool_call>\n{\"name\": \"get_wea", "text\n<tool_call>\n{\"name\": \"get_wea", []),  # cut mid-call
    ("trailing blanks stay  \n", "trailing blanks stay  \n", []),
])
def test_parse_any_chunking(text, content, names):
    whole = parse(text)
    assert whole[0] == content and [n for n, _ in whole[1]] == names
    rng = random.Random(len(text))
    for _ in range(30):
        cut = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6))))
        assert parse(text, cut)[:2] == whole[:2]
    assert len(set(whole[2])) == len(names) and all(i.startswith("call_") for i in whole[2])


def request(**kw) -> ChatCompletionRequest:
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("a", "b")]
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [], "tools": tools, **kw})


def test_tool_choice_plans():
    auto = plan_tools(request())
    assert auto.parse and auto.grammar is None and len(auto.template_tools) == 2
    none = plan_tools(request(tool_choice="none"))
    assert not none.parse and none.template_tools is None and none.grammar is None
    req = plan_tools(request(tool_choice="required"))
    assert req.grammar["at_least_one"] and not req.grammar["stop_after_first"] and len(req.grammar["tags"]) == 2
    one = plan_tools(request(tool_choice="required", parallel_tool_calls=False))
    assert one.grammar["stop_after_first"]
    named = plan_tools(request(tool_choice={"type": "function", "function": {"name": "b"}}))
    assert [t["begin"] for t in named.grammar["tags"]] == ['<tool_call>\n{"name": "b", "arguments": ']
    with pytest.raises(APIError, match="no tool is named 'c'"):
        plan_tools(request(tool_choice={"type": "function", "function": {"name": "c"}}))
    with pytest.raises(APIError, match="tool_choice: requires tools"):
        plan_tools(ChatCompletionRequest.model_validate({"model": "m", "messages": [], "tool_choice": "required"}))


def test_docs_list_exactly_the_accepted_fields():
    """docs/server.md's field table names every field the request models accept, and its refused row none."""
    import pathlib
    import re

    from qwen_vl_distributed.server.protocol import CompletionRequest, StreamOptions

    doc = (pathlib.Path(__file__).parent.parent / "docs" / "server.md").read_text()
    table = doc[doc.index("## The request fields"):doc.index("## Reasoning")]
    rows = [r for r in table.splitlines() if r.startswith("| `")]
    refused_row = next(r for r in rows if "400 naming the field" in r)
    first_cells = [re.sub(r"\([^)]*\)", "", r.split("|")[1]) for r in rows if r is not refused_row]  # not values
    named = {n.split(".")[0] for cell in first_cells for n in re.findall(r"`([a-z_.]+)`", cell)}
    accepted = set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields)
    assert accepted == named
    assert not set(re.findall(r"`([a-z_]+)`", refused_row)) & accepted
    assert all(f"stream_options.{f}" in table or f in table for f in StreamOptions.model_fields)
