"""Structured output: a request's ``response_format`` (OpenAI) or ``structured_outputs`` (vLLM) -> the format the
last stage's grammar enforces (engine/grammar.py), or None for free text.

  response_format {"type": "json_object"}                   any JSON object
  response_format {"type": "json_schema", "json_schema": {"schema": S, ...}}   JSON matching S (strict or not: a
                                                             schema given is a schema enforced, as vLLM does)
  response_format {"type": "structural_tag", "format": F}   an xgrammar structural-tag format F
  structured_outputs {"json": S} | {"json_object": true} | {"regex": R} | {"choice": [...]} | {"grammar": EBNF}
                     | {"structural_tag": F}

JSON is generated with at most ``grammar.JSON_MAX_WHITESPACE`` consecutive blanks between tokens, so no model can
loop on whitespace until max_tokens.
"""

from __future__ import annotations

import json

from ..engine.grammar import check_grammar, json_format, structural_tag
from .errors import APIError
from .protocol import CommonRequest


def _bad(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: {why}", param=param.split(".")[0], code="invalid_value")


def output_format(req: CommonRequest) -> tuple[dict | None, str | None]:
    """(format, the request field it came from), or (None, None) for free text."""
    rf, so = req.response_format, req.structured_outputs
    if rf is not None and rf.type != "text" and so is not None:
        raise _bad("structured_outputs", "send it or response_format, not both")
    if so is not None:
        return _from_structured_outputs(so), "structured_outputs"
    if rf is None or rf.type == "text":
        return None, None
    if rf.type == "json_object":
        return json_format({"type": "object"}), "response_format"
    if rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise _bad("response_format.json_schema.schema", "required for type json_schema")
        return json_format(rf.json_schema.schema_), "response_format"
    if rf.format is None:
        raise _bad("response_format.format", "required for type structural_tag")
    return rf.format, "response_format"


def _from_structured_outputs(so) -> dict:
    given = {k: v for k, v in so.model_dump(by_alias=True).items() if v not in (None, False)}
    if len(given) != 1:
        raise _bad("structured_outputs", f"expected exactly one of json, regex, choice, grammar, json_object, "
                                         f"structural_tag; got {sorted(given) or 'none'}")
    kind, value = next(iter(given.items()))
    if isinstance(value, str) and kind in ("json", "structural_tag"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _bad(f"structured_outputs.{kind}", f"not valid JSON ({e})") from None
    if kind == "json":
        return json_format(value)
    if kind == "json_object":
        return json_format({"type": "object"})
    if kind == "regex":
        return {"type": "regex", "pattern": value}
    if kind == "choice":
        if not value:
            raise _bad("structured_outputs.choice", "expected a non-empty list of strings")
        return {"type": "or", "elements": [{"type": "const_string", "value": c} for c in value]}
    if kind == "grammar":
        return {"type": "grammar", "grammar": value}
    return value


def grammar_spec(fmt: dict | None, field: str | None) -> str | None:
    """The wire form of a format, checked (a grammar that cannot be built is a 400 naming ``field``)."""
    if fmt is None:
        return None
    spec = structural_tag(fmt)
    check_grammar(spec, field)
    return spec
