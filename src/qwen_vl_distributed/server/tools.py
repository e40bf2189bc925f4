"""Tool calling: what the request's tools and tool_choice mean for the prompt, the grammar and the output.

The tools reach the model through the checkpoint's own chat template (the Qwen3-VL templates list them in the
system turn and ask for hermes-style calls: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``).

tool_choice:
  none       the tools are not rendered and the output is not parsed for calls (the model cannot call what it
             was not shown; a conversation's earlier calls and results still render);
  auto       rendered; the output is parsed: calls become ``message.tool_calls``, the rest stays content;
  required   rendered, and a grammar allows only one or more calls to the given tools, each with arguments that
             match the tool's parameters schema (one call when parallel_tool_calls is false);
  {"type": "function", "function": {"name": N}}   the same, one call to N.
A Thinking model reasons first: the grammar starts after ``</think>``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from ..engine.grammar import json_format
from .errors import APIError
from .protocol import ChatCompletionRequest, DeltaFunction, DeltaToolCall, FunctionCall, ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolPlan:
    template_tools: list[dict] | None  # what the chat template renders (None: no tools section)
    grammar: dict | None  # a structural-tag format forcing the calls, or None
    parse: bool  # parse the output for calls


def plan_tools(req: ChatCompletionRequest) -> ToolPlan:
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
    if not req.tools:
        if choice not in ("none", "auto"):
            raise APIError(400, "tool_choice: requires tools", param="tool_choice", code="invalid_value")
        return ToolPlan(None, None, False)
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    names = [t.function.name for t in req.tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: two tools have the same name", param="tools", code="invalid_value")
    if choice == "none":
        return ToolPlan(None, None, False)
    if choice == "auto":
        return ToolPlan(tools, None, True)
    if choice == "required":
        forced, one = req.tools, req.parallel_tool_calls is False
    else:
        name = choice.function.name
        forced = [t for t in req.tools if t.function.name == name]
        if not forced:
            raise APIError(400, f"tool_choice.function.name: no tool is named {name!r}", param="tool_choice",
                           code="invalid_value")
        one = True
    return ToolPlan(tools, _calls_format(forced, one), True)


def _calls_format(tools: list, one: bool) -> dict:
    """One or more hermes-style calls (separated by a newline), each to one of ``tools`` with matching arguments."""
    tags = [{"type": "tag",
             "begin": f'{OPEN}\n{{"name": {json.dumps(t.function.name, ensure_ascii=False)}, "arguments": ',
             "content": json_format(t.function.parameters or {"type": "object"}),
             "end": f"}}\n{CLOSE}"} for t in tools]
    return {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
            "stop_after_first": one}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedOutput:
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


class ToolCallParser:
    """Content text deltas in; (content text, completed calls) out. Text inside ``<tool_call>...</tool_call>`` is
    held until the block closes; a block whose body is not a JSON object with a string "name" stays content.
    Whitespace-only content is held until real text follows (the newlines around calls are not content)."""

    def __init__(self):
        self.buf = ""  # text not yet released: a possible start of <tool_call>, or an open block
        self.blank = ""  # whitespace held back
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> ParsedOutput:
        self.buf += text
        out = ParsedOutput()
        while True:
            start = self.buf.find(OPEN)
            if start < 0:
                keep = _partial_open(self.buf)
                self._content(out, self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                return out
            end = self.buf.find(CLOSE, start)
            if end < 0:
                self._content(out, self.buf[:start])
                self.buf = self.buf[start:]
                return out
            self._content(out, self.buf[:start])
            self._block(out, self.buf[start:end + len(CLOSE)])
            self.buf = self.buf[end + len(CLOSE):]

    def finish(self) -> ParsedOutput:
        """The end of the output: an unclosed block is parsed if it is complete JSON (cut before its close tag),
        else returned as content; held whitespace is content only if no call was made."""
        out = ParsedOutput()
        rest, self.buf = self.buf, ""
        block = rest.lstrip()
        if block.startswith(OPEN):
            self._content(out, rest[: len(rest) - len(block)])
            self._block(out, block)
        else:
            self._content(out, rest)
        if not self.calls and self.blank:
            out.content += self.blank
        self.blank = ""
        return out

    def _content(self, out: ParsedOutput, text: str) -> None:
        if not text:
            return
        text = self.blank + text
        body = text.rstrip()
        self.blank = text[len(body):]
        out.content += body

    def _block(self, out: ParsedOutput, block: str) -> None:
        call = _parse_call(block)
        if call is None:
            self._content(out, block)
            return
        self.blank = ""  # the whitespace before a call was not content
        self.calls.append(call)
        out.calls.append(call)


def _partial_open(text: str) -> int:
    """Length of the longest tail of ``text`` that could begin ``<tool_call>``."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


def _parse_call(block: str) -> ToolCall | None:
    body = block[len(OPEN):]
    if body.endswith(CLOSE):
        body = body[: -len(CLOSE)]
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCall(id=new_call_id(), function=FunctionCall(name=obj["name"], arguments=text))


def delta_calls(calls: list[ToolCall], first_index: int) -> list[list[DeltaToolCall]]:
    """How a completed call streams, as OpenAI and vLLM stream it: a piece with its id, type and name (arguments
    empty), then a piece with the arguments."""
    pieces = []
    for k, c in enumerate(calls):
        i = first_index + k
        pieces.append([DeltaToolCall(index=i, id=c.id, type="function",
                                     function=DeltaFunction(name=c.function.name, arguments=""))])
        pieces.append([DeltaToolCall(index=i, function=DeltaFunction(arguments=c.function.arguments))])
    return pieces
