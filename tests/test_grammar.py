"""Grammars on the sampler: under random logits every draw stays inside the grammar, the structure completes and
then only the stop tokens are allowed; a grammar with ``grammar_after`` starts after that token."""

from __future__ import annotations

import json

import pytest
import torch

from qwen_vl_distributed.engine.grammar import (GrammarBackend, GrammarError, check_grammar, json_format,
                                                structural_tag)
from qwen_vl_distributed.engine.sampler import SequenceSampler
from qwen_vl_distributed.engine.sampling import SamplingParams
from qwen_vl_distributed.model.config import preset
from synth_model import tiny_model_dir

IM_END, THINK_END = 151645, 151668
V = preset("tiny").text.vocab_size
SCHEMA = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]},  # (not in alphabetical order)
                                           "city": {"type": "string", "maxLength": 6},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "days", "unit"], "additionalProperties": False}


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    b = GrammarBackend(tiny_model_dir(tmp_path_factory), V, [IM_END])
    yield b
    b.close()


def generate(backend, fmt, after=None, steps=300, seed=0, temperature=1.0):
    sampler = SequenceSampler(backend)
    params = SamplingParams(temperature=temperature, seed=seed, grammar=structural_tag(fmt), grammar_after=after)
    sampler.start(0, {"params": params.wire()}, [1, 2, 3])
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        logits = torch.randn(1, V, generator=g) * 3
        if after is not None and len(out) == 2:
            logits[0, after] = 50.0  # the "model" closes its reasoning after two tokens
        out.append(sampler.sample([0], logits).tokens.item())
        if out[-1] == IM_END:
            return out
    raise AssertionError(f"no stop within {steps} tokens")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_under_random_logits(backend, seed, tmp_path_factory):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir(tmp_path_factory))
    out = generate(backend, json_format(SCHEMA), seed=seed)
    value = json.loads(tok.decode(out[:-1]))  # (strict: no raw control characters in strings)
    assert list(value) == ["unit", "city", "days"] and len(value["city"]) <= 6  # in the schema's order
    assert 1 <= value["days"] <= 9 and value["unit"] in ("c", "f")


def test_grammar_starts_after_its_token(backend, tmp_path_factory):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir(tmp_path_factory))
    out = generate(backend, {"type": "or", "elements": [{"type": "const_string", "value": "yes"},
                                                        {"type": "const_string", "value": "no"}]}, after=THINK_END)
    assert out[2] == THINK_END and tok.decode(out[3:-1]) in ("yes", "no")


def test_bad_grammars_are_refused_before_the_last_stage():
    with pytest.raises(GrammarError, match=r"response_format: cannot build a grammar from it \(.*objectx"):
        check_grammar(structural_tag({"type": "json_schema", "json_schema": {"type": "objectx"}}), "response_format")
    with pytest.raises(GrammarError, match="structured_outputs: cannot build"):
        check_grammar(structural_tag({"type": "regex", "pattern": "("}), "structured_outputs")
