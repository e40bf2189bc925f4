"""Reasoning / answer split of the Thinking model's output, whole and streamed."""

from __future__ import annotations

import random

import pytest

from qwen_vl_distributed.engine.reasoning import ReasoningStreamParser, split_reasoning


@pytest.mark.parametrize("text, reasoning, content", [
    ("The user asks 2+2.\n</think>\n\n4", "The user asks 2+2.", "4"),
    ("plan</think>answer\n", "plan", "answer\n"),
    ("still thinking\n", "still thinking\n", ""),  # no </think>: all reasoning
    ("", "", ""),
    ("\n\n</think>\n\nJust the answer", "", "Just the answer"),
    ("<think>\nrepeated open tag\n</think>\n\nA", "repeated open tag", "A"),
    ("a</think>b</think>c", "a", "b</think>c"),
    ("x <think> y</think>z", "x <think> y", "z"),
    ("line1\n\nline2\n\n</think>\n\n\nans\n\nmore", "line1\n\nline2", "ans\n\nmore"),
    ("</thin", "</thin", ""),
])
def test_split(text, reasoning, content):
    assert split_reasoning(text) == (reasoning, content)


def stream(deltas):
    p = ReasoningStreamParser()
    pieces = [p.feed(d) for d in deltas] + [p.finish()]
    return "".join(r for r, _ in pieces), "".join(c for _, c in pieces), pieces


def test_stream_tag_split_across_deltas():
    r, c, pieces = stream(["Thinking.\n", "</", "thi", "nk>", "\n", "\nHi", " there"])
    assert (r, c) == ("Thinking.", "Hi there")
    assert pieces[0] == ("Thinking.", "")  # the trailing newline waits for what follows
    assert pieces[1] == pieces[2] == ("", "")  # a possible tag prefix is held back
    assert pieces[5] == ("", "Hi")


def test_stream_false_alarm_releases_held_text():
    r, c, pieces = stream(["a\n", "</t", "able>", " b"])
    assert (r, c) == ("a\n</table> b", "")
    assert pieces[2] == ("\n</table>", "")


def test_stream_reasoning_never_closed():
    r, c, _ = stream(["just ", "thinking\n", "\n"])
    assert (r, c) == ("just thinking\n\n", "")


SAMPLES = [
    "The user asks 2+2.\n</think>\n\n4",
    "<think>\nx\n</think>\n\ny",
    "\n\n<thi",
    "<think>",
    "a\n\n</th\n</think>\n\n\nb</think>c",
    "< / think > <think </think",
    "emoji 🙂\n</think>\n\n答案",
    "\n</think>",
    "no tags at all\n\n",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_equals_split_for_every_chunking(text):
    expected = split_reasoning(text)
    assert stream(list(text))[:2] == expected  # one character at a time
    rng = random.Random(text)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), k=rng.randint(0, min(5, len(text) - 1)))) if len(text) > 1 else []
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        assert stream(chunks)[:2] == expected, chunks


def test_in_content_flag():
    p = ReasoningStreamParser()
    p.feed("r</think")
    assert not p.in_content
    p.feed(">")
    assert p.in_content


def test_stream_equals_split_random_texts():
    rng = random.Random(0)
    atoms = ["a", "b ", "\n", "\n\n", "<think>", "</think>", "</", "<", "think", ">", "/", "🙂"]
    for _ in range(500):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        cuts = sorted(set(rng.randint(0, len(text)) for _ in range(rng.randint(0, 6))))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        assert stream(chunks)[:2] == split_reasoning(text), (text, chunks)
