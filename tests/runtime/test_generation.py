"""The KV-cache loops against full-recompute references over the same ONNX graph."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from ai_platform.operations import Message
from ai_platform.runtime import generation
from ai_platform.runtime.generation import GenerationCancelled
from ai_platform.runtime.model import LanguageModel
from ai_platform.runtime.onnx_model import OnnxDecoder
from runtime_reference import greedy_generate, score_options

MESSAGES = [Message("system", "You are helpful."), Message("user", "Summarize: the quick brown fox.")]


def full_logits(decoder: OnnxDecoder, ids: Sequence[int]) -> np.ndarray:
    """Logits for every position of ``ids`` in one pass without a KV cache."""
    n = len(ids)
    logits, _ = decoder.forward(
        np.asarray([ids], dtype=np.int64),
        np.ones((1, n), dtype=np.int64),
        np.arange(n, dtype=np.int64)[None],
        decoder.empty_past(1),
    )
    row: np.ndarray = logits[0]
    return row


def naive_greedy(decoder: OnnxDecoder, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(np.argmax(full_logits(decoder, ids)[-1])))
    return ids[len(prompt) :]


def naive_log_likelihood(decoder: OnnxDecoder, prompt: list[int], answer: list[int]) -> float:
    logits = full_logits(decoder, prompt + answer).astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return float(sum(log_probs[len(prompt) - 1 + j, token] for j, token in enumerate(answer)))


@pytest.fixture(scope="module")
def prompt(tiny_model: LanguageModel) -> list[int]:
    return tiny_model.encode_prompt(MESSAGES)


@pytest.mark.parametrize("prefill_chunk", [generation.PREFILL_CHUNK, 7])
def test_kv_cache_greedy_matches_full_recompute(
    any_model: LanguageModel, prompt: list[int], prefill_chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_model = any_model  # both tiny models share the tokenizer, so `prompt` fits either
    assert len(prompt) > 7
    monkeypatch.setattr(generation, "PREFILL_CHUNK", prefill_chunk)
    result = greedy_generate(tiny_model.decoder, prompt, max_new_tokens=40, eos_ids=())
    assert len(set(result.tokens)) > 5, "the test model's output is degenerate; the comparison would prove little"
    assert result.tokens == naive_greedy(tiny_model.decoder, prompt, 40)
    assert result.finish_reason == "length"


def test_max_new_tokens_is_enforced(tiny_model: LanguageModel, prompt: list[int]) -> None:
    for limit in (0, 1, 7):
        result = greedy_generate(tiny_model.decoder, prompt, max_new_tokens=limit, eos_ids=())
        assert len(result.tokens) == limit
        assert result.finish_reason == "length"


def test_eos_stops_generation_and_is_not_counted(tiny_model: LanguageModel, prompt: list[int]) -> None:
    free = greedy_generate(tiny_model.decoder, prompt, max_new_tokens=20, eos_ids=()).tokens
    # A token the model produces for the first time after a few steps.
    eos = next(token for k, token in enumerate(free) if k >= 3 and token not in free[:k])
    result = greedy_generate(tiny_model.decoder, prompt, max_new_tokens=20, eos_ids={eos})
    assert result.tokens == free[: free.index(eos)]
    assert result.finish_reason == "stop"


def test_generation_stops_at_the_context_size(tiny_model: LanguageModel) -> None:
    room = 3
    prompt = [5] * (tiny_model.decoder.max_positions - room)
    result = greedy_generate(tiny_model.decoder, prompt, max_new_tokens=100, eos_ids=())
    assert len(result.tokens) == room
    assert result.finish_reason == "length"


def test_should_stop_cancels_between_steps(tiny_model: LanguageModel, prompt: list[int]) -> None:
    calls = 0

    def stop_after_three() -> bool:
        nonlocal calls
        calls += 1
        return calls > 3

    with pytest.raises(GenerationCancelled):
        greedy_generate(tiny_model.decoder, prompt, max_new_tokens=50, eos_ids=(), should_stop=stop_after_three)


def test_batched_option_scores_equal_scoring_each_alone(
    any_model: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_model = any_model
    options = ["billing", "technical support", "a", "Hello world! How are you today?", "12345"]
    prompt, answers = tiny_model.encode_choice(MESSAGES, options)
    assert all(answer[-1] == tiny_model.end_of_turn_id for answer in answers)
    assert len({len(answer) for answer in answers}) > 1  # padding is exercised
    batched = score_options(tiny_model.decoder, prompt, answers)
    alone = [score_options(tiny_model.decoder, prompt, [answer])[0] for answer in answers]
    naive = [naive_log_likelihood(tiny_model.decoder, prompt, answer) for answer in answers]
    np.testing.assert_allclose(batched, alone, atol=1e-4, rtol=0)
    np.testing.assert_allclose(batched, naive, atol=1e-4, rtol=0)
    monkeypatch.setattr(generation, "MAX_OPTION_BATCH", 2)  # several chunks, the last one partial
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 5)
    np.testing.assert_allclose(score_options(tiny_model.decoder, prompt, answers), batched, atol=1e-4, rtol=0)


def test_options_are_encoded_as_the_answer_after_the_prompt(tiny_model: LanguageModel) -> None:
    prompt, answers = tiny_model.encode_choice(MESSAGES, ["billing", " billing"])
    text = tiny_model.tokenizer.render(MESSAGES)
    for option, answer in zip(["billing", " billing"], answers, strict=True):
        assert tiny_model.tokenizer.encode(text + option) == prompt + answer[:-1]
