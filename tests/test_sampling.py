"""Sampling: parameter validation, greedy, seeded determinism, filters, penalties, stop strings."""

from __future__ import annotations

import pytest
import torch

from qwen_vl_distributed.engine.grammar import allow_only
from qwen_vl_distributed.engine.sampling import (SamplingParamError, SamplingParams, StopStringMatcher, TokenHistory,
                                                 apply_bitmask, apply_penalties, draw, filter_top_k_top_p,
                                                 make_generator, sample)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.1}, "temperature: must be >= 0.0"),
    ({"temperature": float("nan")}, "temperature: expected a finite number"),
    ({"top_p": 0.0}, "top_p: must be > 0.0"),
    ({"top_p": 1.5}, "top_p: must be <= 1.0"),
    ({"top_k": -2}, "top_k: must be >= -1"),
    ({"top_k": 2.5}, "top_k: expected an integer"),
    ({"seed": "7"}, "seed: expected an integer"),
    ({"max_new_tokens": 0}, "max_new_tokens: must be >= 1"),
    ({"presence_penalty": 2.5}, "presence_penalty: must be <= 2.0"),
    ({"frequency_penalty": -3}, "frequency_penalty: must be >= -2.0"),
    ({"repetition_penalty": 0}, "repetition_penalty: must be > 0.0"),
    ({"stop_token_ids": [1, -1]}, "stop_token_ids[1]: must be >= 0"),
    ({"stop": ["ok", ""]}, "stop[1]: expected a non-empty string"),
    ({"temperature": True}, "temperature: expected a finite number"),
    ({"min_p": 1.5}, "min_p: must be <= 1.0"),
    ({"logprobs": 21}, "logprobs: at most 20"),
    ({"logit_bias": {5: 101}}, "logit_bias[5]: must be <= 100.0"),
    ({"logit_bias": {-1: 1}}, "logit_bias[-1]: must be >= 0"),
    ({"min_tokens": -1}, "min_tokens: must be >= 0"),
])
def test_validation_names_the_parameter(kwargs, message):
    with pytest.raises(SamplingParamError) as e:
        SamplingParams(**kwargs)
    assert str(e.value).startswith(message)


def test_normalization_and_generation_config():
    p = SamplingParams(top_k=-1, stop="END", stop_token_ids=[5])
    assert (p.top_k, p.stop, p.stop_token_ids) == (0, ("END",), (5,))
    g = SamplingParams.from_generation_config({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20},
                                              max_new_tokens=9, seed=None)
    assert (g.temperature, g.top_p, g.top_k, g.max_new_tokens) == (0.6, 0.95, 20, 9)
    assert SamplingParams.from_generation_config({"do_sample": False, "temperature": 0.7}).greedy


def logits_batch(B=3, V=50, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    x = logits_batch()
    out = sample(x, [SamplingParams(temperature=0.0)] * 3, [None] * 3)
    assert out.tolist() == x.argmax(-1).tolist() and out.dtype == torch.int64


def run(params, rows, steps=20, seeds=None):
    """Sample ``steps`` tokens for batch rows from fixed logits; returns per-row token lists."""
    gens = [make_generator(s) for s in seeds]
    tokens = [[] for _ in rows]
    for t in range(steps):
        x = torch.stack([logits_batch(1, 50, seed=1000 * r + t)[0] for r in rows])
        for i, tok in enumerate(sample(x, params, gens).tolist()):
            tokens[i].append(tok)
    return tokens


def test_seed_reproducible_regardless_of_batch():
    p = SamplingParams(temperature=1.0, seed=123)
    alone = run([p], rows=[7], seeds=[123])[0]
    others = [SamplingParams(temperature=0.7, top_k=5, seed=9), p, SamplingParams(temperature=0.0)]
    batched = run(others, rows=[1, 7, 2], seeds=[9, 123, None])[1]
    assert alone == batched
    assert alone != run([p], rows=[7], seeds=[124])[0]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    x = probs.log().repeat(4000, 1)
    gens = [make_generator(i) for i in range(4000)]
    out = sample(x, [SamplingParams(temperature=1.0)] * 4000, gens)
    freq = torch.bincount(out, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_top_k_keeps_ties_and_disables():
    x = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    kept = filter_top_k_top_p(x, [2], [1.0]).isfinite()[0].tolist()
    assert kept == [False, True, True, True, False]  # ties with the k-th value stay, as in HF
    assert torch.equal(filter_top_k_top_p(x, [0], [1.0]), x)


def test_top_p_smallest_prefix_reaching_p():
    x = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None]
    assert filter_top_k_top_p(x, [0], [0.75]).isfinite()[0].tolist() == [True, True, False, False]
    assert filter_top_k_top_p(x, [0], [0.1]).isfinite()[0].tolist() == [True, False, False, False]
    assert filter_top_k_top_p(x, [0], [0.81]).isfinite()[0].tolist() == [True, True, True, False]


def test_top_p_applies_to_top_k_renormalized():
    # top-3 renormalized: 0.444, 0.333, 0.222 -> mass before the third is 0.778 >= 0.72, so it is dropped.
    # Without renormalization the mass before it would be 0.7 < 0.72 and it would stay.
    x = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()[None]
    assert filter_top_k_top_p(x, [3], [0.72]).isfinite()[0].tolist() == [True, True, False, False]


def test_filters_per_row_and_in_sampling():
    x = torch.tensor([[4.0, 3.0, 2.0, 1.0]]).repeat(2, 1)
    f = filter_top_k_top_p(x, [1, 0], [1.0, 1.0]).isfinite()
    assert f[0].tolist() == [True, False, False, False] and f[1].all()
    gens = [make_generator(s) for s in range(300)]
    out = sample(x[:1].repeat(300, 1), [SamplingParams(temperature=5.0, top_k=2)] * 300, gens)
    assert set(out.tolist()) == {0, 1}


def test_repetition_penalty_matches_hf():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    x = logits_batch(1, 30)
    prompt, output = [3, 4, 5], [5, 7, 29]
    h = TokenHistory(prompt, 30)
    for t in output:
        h.append(torch.tensor(t))
    ours = apply_penalties(x, [SamplingParams(repetition_penalty=1.3)], [h])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), x.clone())
    assert torch.allclose(ours, ref)
    assert not torch.equal(ours, x)


def test_presence_and_frequency_penalties_on_output_only():
    x = torch.zeros(1, 6)
    h = TokenHistory([1, 1, 2], 6)  # prompt tokens do not count for presence / frequency
    for t in [2, 3, 3, 3]:
        h.append(t)
    out = apply_penalties(x, [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], [h])
    assert out[0].tolist() == [0.0, 0.0, -0.75, -1.25, 0.0, 0.0]
    assert h.counts.tolist() == [0, 0, 1, 3, 0, 0] and h.seen.tolist() == [False, True, True, True, False, False]


def test_penalties_change_greedy_choice():
    x = torch.tensor([[2.0, 1.9, 0.0]])
    h = TokenHistory([0], 3)
    p = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert sample(x, [p], [None], [h]).tolist() == [1]
    assert sample(x, [SamplingParams(temperature=0.0)], [None]).tolist() == [0]


def test_stop_strings_across_deltas():
    m = StopStringMatcher(["STOP", "\n\n"])
    assert m.feed("Hello ST") == ("Hello ", False)
    assert m.feed("O") == ("", False)
    assert m.feed("Px") == ("", True)
    assert m.stopped and m.feed("more") == ("", True)
    m = StopStringMatcher(["abc"])
    assert m.feed("xab") == ("x", False)
    assert m.feed("d") == ("abd", False)
    assert m.feed("ab") == ("", False) and m.flush() == "ab"
    m = StopStringMatcher(["xyz", "b"])
    assert m.feed("axyzb") == ("a", True)  # the earliest stop wins
    assert StopStringMatcher([]).feed("anything") == ("anything", False)


def test_params_are_immutable_and_hashable():
    p = SamplingParams(stop=["a"], stop_token_ids=[1])
    with pytest.raises(Exception):
        p.temperature = 2.0  # type: ignore[misc]
    assert hash(p) == hash(SamplingParams(stop=("a",), stop_token_ids=(1,)))


def test_sequence_sampler_history_spans_every_prefill_chunk():
    """A prompt that arrives in chunks (start, then extend) is penalised as a whole: its token from the last chunk
    loses its lead under a repetition penalty, as it does when the prompt arrives at once."""
    from qwen_vl_distributed.engine.sampler import SequenceSampler

    logits = torch.zeros(1, 10)
    logits[0, 7] = 2.0  # the favourite, a token of the prompt's last chunk
    logits[0, 3] = 1.5
    params = {"params": SamplingParams(temperature=0.0, repetition_penalty=2.0).wire()}
    whole, chunked = SequenceSampler(), SequenceSampler()
    whole.start(0, params, [1, 2, 7])
    chunked.start(0, params, [1, 2])
    chunked.extend(0, [7])
    assert whole.sample([0], logits).tokens.tolist() == chunked.sample([0], logits).tokens.tolist() == [3]


def test_sequence_sampler_history_includes_a_cached_prefix():
    """With a cached prefix the first step brings only the prompt's tail; the cached head arrives as history_prefix
    and is penalised like the rest of the prompt."""
    from qwen_vl_distributed.engine.sampler import SequenceSampler

    logits = torch.zeros(1, 10)
    logits[0, 7] = 2.0  # the favourite, a token of the cached prefix only
    logits[0, 3] = 1.5
    params = {"params": SamplingParams(temperature=0.0, repetition_penalty=2.0).wire()}
    whole, cached = SequenceSampler(), SequenceSampler()
    whole.start(0, params, [7, 1, 2])
    cached.start(0, {**params, "history_prefix": [7]}, [1, 2])
    assert whole.sample([0], logits).tokens.tolist() == cached.sample([0], logits).tokens.tolist() == [3]


def test_logprobs_are_of_the_distribution_drawn_from():
    """After penalties, bias and temperature (1 for greedy), before the top-k / top-p / min-p truncation."""
    x = logits_batch(2, 50)
    hot = SamplingParams(temperature=0.5, top_k=3, logit_bias={7: 5.0}, logprobs=4, seed=1)
    cold = SamplingParams(temperature=0.0, logprobs=0)
    d = draw(x, [hot, cold], [make_generator(1), None])
    biased = x[0].clone()
    biased[7] += 5.0
    want = torch.log_softmax(biased / 0.5, dim=-1)
    assert d.logprobs[0].logprob == pytest.approx(want[d.tokens[0]].item(), abs=1e-6)
    top_lp, top_ids = want.topk(4)
    assert [t for t, _ in d.logprobs[0].top] == top_ids.tolist()
    assert [lp for _, lp in d.logprobs[0].top] == pytest.approx(top_lp.tolist(), abs=1e-6)
    assert d.tokens[0].item() in top_ids[:3].tolist()  # drawn from the top-3
    assert d.logprobs[1].logprob == pytest.approx(torch.log_softmax(x[1], -1).max().item(), abs=1e-6)
    assert d.logprobs[1].top == []
    assert draw(x, [SamplingParams()] * 2, [make_generator(0)] * 2).logprobs == [None, None]


def test_logit_bias_and_min_p():
    x = logits_batch(1, 50)
    forced = SamplingParams(temperature=1.0, logit_bias={11: 100.0})
    assert all(sample(x, [forced], [make_generator(s)]).item() == 11 for s in range(5))
    banned = SamplingParams(temperature=0.0, logit_bias={int(x[0].argmax()): -100.0})
    assert sample(x, [banned], [None]).item() != int(x[0].argmax())
    peaked = torch.full((1, 50), 0.0)
    peaked[0, 4] = 6.0  # p(4) ~ 0.89: with min_p 0.5 nothing else is within half of it
    kept = SamplingParams(temperature=1.0, min_p=0.5)
    assert {sample(peaked, [kept], [make_generator(s)]).item() for s in range(30)} == {4}
    loose = SamplingParams(temperature=1.0, min_p=0.0)
    assert len({sample(peaked, [loose], [make_generator(s)]).item() for s in range(60)}) > 1


def test_bitmask_allows_exactly_its_tokens():
    V = 70
    x = logits_batch(2, V)
    bitmask = torch.zeros(1, 3, dtype=torch.int32)  # row 1 only: tokens 3, 40 and 63 (the sign bit of word 1)
    allow_only(bitmask, 0, [3, 40, 63])
    assert bitmask[0, 1].item() < 0
    masked = apply_bitmask(x.clone(), bitmask, [1])
    assert torch.equal(masked[0], x[0])
    assert (masked[1] > float("-inf")).nonzero().flatten().tolist() == [3, 40, 63]
    p = SamplingParams(temperature=1.0)
    picks = {draw(x, [p, p], [make_generator(s)] * 2, bitmask=(bitmask, [1])).tokens[1].item() for s in range(20)}
    assert picks <= {3, 40, 63}


def test_min_tokens_bans_the_stop_tokens_until_reached():
    from qwen_vl_distributed.engine.sampler import SequenceSampler

    logits = torch.zeros(1, 10)
    logits[0, 9] = 5.0  # the stop token is the favourite
    s = SequenceSampler()
    s.start(0, {"params": SamplingParams(temperature=0.0, min_tokens=2).wire(), "stop_ids": [9]}, [1, 2])
    assert [s.sample([0], logits).tokens.item() for _ in range(3)] == [0, 0, 9]


def test_sequence_sampler_drops_a_released_sequence_and_keeps_the_others():
    from qwen_vl_distributed.engine.sampler import SequenceSampler

    params = {"params": SamplingParams(temperature=0.0, repetition_penalty=2.0).wire()}
    sampler = SequenceSampler()
    sampler.start(4, params, [1])
    sampler.start(9, params, [2])
    sampler.release(4)
    sampler.release(123)  # never seen here: nothing to drop
    assert list(sampler.states) == [9] and sampler.sample([9], torch.zeros(1, 10)).tokens.shape == (1,)
    with pytest.raises(KeyError):
        sampler.sample([4], torch.zeros(1, 10))
