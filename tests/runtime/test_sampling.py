"""Sampling: temperature, top_p nucleus and seeds, on known logits and through the tiny model's batch.

Greedy (temperature 0, the default) stays argmax, bit for bit; a sampled token follows
softmax(logits / temperature) within the nucleus; each generation has a generator of its own.
"""

from __future__ import annotations

import numpy as np
import pytest

from ai_platform.operations import Message
from ai_platform.runtime.generation import (
    GREEDY,
    NUCLEUS_CANDIDATES,
    Generated,
    Sampling,
    greedy_token,
    sample_token,
)
from ai_platform.runtime.kv_batch import new_batch
from ai_platform.runtime.model import LanguageModel
from ai_platform.runtime.model_runner import ModelRunner
from ai_platform.runtime.scheduler import Scheduler, SequenceRequest
from ai_platform.runtime.stop_strings import StopFilter, cut_at_stop
from runtime_reference import greedy_generate

LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03], dtype=np.float32))
DRAWS = 20_000


def frequencies(sampling: Sampling, logits: np.ndarray = LOGITS, draws: int = DRAWS) -> np.ndarray:
    sample = sampling.sampler()
    counts = np.bincount([sample(logits) for _ in range(draws)], minlength=len(logits))
    return counts / draws


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_is_argmax_and_the_default() -> None:
    assert Sampling() == GREEDY and GREEDY.sampler() is greedy_token
    assert Sampling(temperature=0.0, seed=5).sampler() is greedy_token
    logits = np.array([0.1, 3.0, 3.0, -1.0], dtype=np.float32)
    assert greedy_token(logits) == 1  # the first of equals, as np.argmax


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draws_follow_softmax_of_logits_over_temperature(temperature: float) -> None:
    expected = softmax(LOGITS.astype(np.float64) / temperature)
    observed = frequencies(Sampling(temperature=temperature, seed=1))
    # 20,000 draws: each frequency within ~5 standard errors of its probability.
    tolerance = 5 * np.sqrt(expected * (1 - expected) / DRAWS)
    assert np.all(np.abs(observed - expected) <= tolerance), (observed, expected)


def test_top_p_keeps_the_smallest_nucleus_and_renormalises() -> None:
    # 0.5 + 0.25 = 0.75 < 0.8: the nucleus needs the third token too (0.9); the last two never come.
    observed = frequencies(Sampling(temperature=1.0, top_p=0.8, seed=2))
    assert observed[3] == observed[4] == 0
    expected = np.array([0.5, 0.25, 0.15]) / 0.9
    assert np.all(np.abs(observed[:3] - expected) <= 5 * np.sqrt(expected * (1 - expected) / DRAWS))
    # A nucleus reached exactly by the first token holds it alone; top_p 0 is greedy.
    assert set(np.flatnonzero(frequencies(Sampling(temperature=1.0, top_p=0.5, seed=3), draws=500))) == {0}
    assert set(np.flatnonzero(frequencies(Sampling(temperature=5.0, top_p=0.0, seed=3), draws=500))) == {0}


def test_top_p_over_a_large_vocabulary_matches_a_full_sort() -> None:
    # More tokens than NUCLEUS_CANDIDATES: the nucleus is found among the likeliest, or by a full sort.
    rng = np.random.default_rng(0)
    for spread, top_p in ((8.0, 0.9), (0.01, 0.95)):  # peaked: few tokens; flat: more than the candidates
        logits = (rng.standard_normal(4 * NUCLEUS_CANDIDATES) * spread).astype(np.float32)
        probs = softmax(logits.astype(np.float64))
        order = np.argsort(-probs, kind="stable")
        nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1].tolist())
        draws = {sample_token(logits, temperature=1.0, top_p=top_p, rng=rng) for _ in range(2000)}
        assert draws <= nucleus
        if spread == 0.01:
            assert len(nucleus) > NUCLEUS_CANDIDATES and len(draws) > NUCLEUS_CANDIDATES // 2


def test_a_seed_repeats_its_draws_and_each_sampler_has_its_own_generator() -> None:
    logits = np.zeros(1000, dtype=np.float32)
    first = Sampling(temperature=1.0, seed=42).sampler()
    second = Sampling(temperature=1.0, seed=42).sampler()
    a = [first(logits) for _ in range(50)]
    # Interleaving another sampler's draws changes nothing: generators are not shared.
    other = Sampling(temperature=1.0, seed=42).sampler()
    b = []
    for _ in range(50):
        other(logits)
        b.append(second(logits))
    assert a == b
    c = [Sampling(temperature=1.0, seed=43).sampler()(logits) for _ in range(1)]
    assert [Sampling(temperature=1.0, seed=43).sampler()(logits) for _ in range(1)] == c
    assert [Sampling(temperature=1.0, seed=-1).sampler()(logits) for _ in range(3)] == [
        Sampling(temperature=1.0, seed=2**64 - 1).sampler()(logits) for _ in range(3)
    ]


@pytest.mark.parametrize("bad", [{"temperature": -0.1}, {"temperature": float("nan")}, {"top_p": 1.5}])
def test_invalid_sampling_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Sampling(**bad)


def test_stop_strings_cut_the_text_and_streams_never_show_them() -> None:
    assert cut_at_stop("one. two\n\nthree", ["\n\n", "two"]) == "one. "
    assert cut_at_stop("no stop here", ["xyz"]) == "no stop here"
    shown = StopFilter(["END", "\n\n"])
    pieces = [shown.push(d) for d in ["Hello", " E", "N", "ding", " world", "\n", "\nafter"]]
    assert "".join(pieces) + shown.finish() == "Hello ENding world"
    assert pieces[1] == " " and pieces[2] == ""  # "E" and "EN" are held back until they cannot be "END"
    unstopped = StopFilter(["END"])
    assert unstopped.push("xE") == "x" and unstopped.finish() == "E"


def run_batch(model: LanguageModel, samplings: list[Sampling], budget: int = 12) -> list[list[int]]:
    """Each sampling's generation of one prompt, all in one continuous batch."""
    prompt = model.encode_prompt([Message("user", "Tell me a story about a fox.")])
    results: dict[int, Generated] = {}
    batch = Scheduler(ModelRunner(new_batch(model.decoder)), max_batch=8)
    for index, sampling in enumerate(samplings):

        def finish(result: Generated | None, error: BaseException | None, index: int = index) -> None:
            assert error is None and result is not None
            results[index] = result

        batch.admit(SequenceRequest(prompt, budget, frozenset(), finish, sample=sampling.sampler()))
    while len(results) < len(samplings):
        batch.step()
    return [results[i].tokens for i in range(len(samplings))]


def test_batch_rows_sample_independently_and_greedy_rows_are_unchanged(tiny_model: LanguageModel) -> None:
    prompt = tiny_model.encode_prompt([Message("user", "Tell me a story about a fox.")])
    greedy = greedy_generate(tiny_model.decoder, prompt, max_new_tokens=12, eos_ids=frozenset()).tokens
    seeded = Sampling(temperature=1.5, seed=7)
    rows = run_batch(tiny_model, [GREEDY, seeded, Sampling(temperature=1.5, seed=8), seeded])
    assert rows[0] == greedy  # a greedy row in a sampling batch: exactly as alone
    assert rows[1] == rows[3]  # the same seed in two rows: the same draws
    assert rows[1] != rows[2]  # another seed: other tokens (random weights, temperature 1.5: near certain)
    assert run_batch(tiny_model, [seeded])[0] == rows[1]  # and alone as in the batch
