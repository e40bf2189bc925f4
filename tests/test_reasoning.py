"""The reasoning / answer split by token id, framing newlines, stop strings per part (engine/output.py)."""

from __future__ import annotations

import random

import pytest

from qwen_vl_distributed.engine.output import OutputStream
from qwen_vl_distributed.engine.processor import IncrementalDetokenizer
from qwen_vl_distributed.engine.reasoning import ThinkTokens

START, END = 1000, 1001  # <think>, </think>
THINK = ThinkTokens(START, END)


class CharTokenizer:
    """One token per character (its code point); the think tags decode to nothing, as with a tokenizer that marks
    them special -- the split must not depend on seeing them in the text."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i not in (START, END))


class CharProcessor:
    tokenizer = CharTokenizer()

    def detokenizer(self, skip_special_tokens=True):
        return IncrementalDetokenizer(self.tokenizer, skip_special_tokens)


def ids(text: str) -> list[int]:
    """'[' stands for <think>, ']' for </think>."""
    return [START if c == "[" else END if c == "]" else ord(c) for c in text]


def run(text: str, opened: bool = True, stops=(), include=False) -> tuple[str, str, bool]:
    s = OutputStream(CharProcessor(), THINK, opened, stops, include)
    r = c = ""
    stopped = False
    for t in ids(text):
        p = s.add(t)
        r, c, stopped = r + p.reasoning, c + p.content, stopped or p.stopped
    if not stopped:
        p = s.finish()
        r, c, stopped = r + p.reasoning, c + p.content, p.stopped
    assert (r, c) == (s.reasoning, s.content)
    return r, c, stopped


@pytest.mark.parametrize("text, reasoning, content", [
    ("Let me think.\n]\n\nThe answer.", "Let me think.", "The answer."),
    ("\n\nplan\n\n\n]\n\nanswer\n", "plan", "answer\n"),
    ("[\nrepeated open tag\n]answer", "repeated open tag", "answer"),
    ("a [ inside ] b", "a  inside ", " b"),  # a <think> after reasoning text is part of it (here: no text)
    ("cut by max tokens\n", "cut by max tokens\n", ""),
    ("]answer only", "", "answer only"),
    ("line one\n\nline two]x", "line one\n\nline two", "x"),
])
def test_split_by_token_id(text, reasoning, content):
    assert run(text)[:2] == (reasoning, content)


def test_without_an_opened_think_block_everything_is_content():
    assert run("abc]def", opened=False)[:2] == ("", "abcdef")


def test_prompt_opens_a_think_block():
    assert THINK.opened_by([5, START, 6])
    assert not THINK.opened_by([5, START, 6, END, 7])
    assert not THINK.opened_by([5, 6])
    assert THINK.opened_by([START, 1, END, 2, START])


def test_stop_strings_per_part():
    assert run("Let me think.]The answer is yes.", stops=["answer"]) == ("Let me think.", "The ", True)
    assert run("Let me think.]The answer is yes.", stops=["think"]) == ("Let me ", "", True)
    assert run("Let me think.]The answer is yes.", stops=["answer"], include=True) == ("Let me think.",
                                                                                       "The answer", True)
    assert run("abc]tail ends with sto", stops=["stop"]) == ("abc", "tail ends with sto", False)


def test_random_texts_stream_like_a_whole():
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice("ab\n ]") for _ in range(rng.randint(0, 14)))
        head, sep, tail = text.partition("]")
        want = (head.strip("\n"), tail.replace("]", "").lstrip("\n")) if sep else (head.lstrip("\n"), "")
        assert run(text)[:2] == want, text
