"""Log-probabilities of generated tokens (OpenAI's ``logprobs``/``top_logprobs``; issue 13, item 2).

Each token's log-probability is log_softmax of the model's raw logits (before temperature and top_p),
computed by the sampler only when asked; the served values equal a reference run of the same model
outside the batch; a stream's pieces carry the same entries as the completion, stop strings included;
a token that is part of a character has U+FFFD as its text and its own bytes.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ai_platform.operations import Completion, Generate, Message, TextDelta, TokenLogprob
from ai_platform.runtime.generation import (
    GREEDY,
    Generated,
    PickedLogprobs,
    Sampling,
    _log_softmax,
    greedy_token,
    picked_logprobs,
)
from ai_platform.runtime.kv_batch import new_batch
from ai_platform.runtime.model import LanguageModel
from ai_platform.runtime.model_runner import ModelRunner
from ai_platform.runtime.onnx_model import OnnxDecoder
from ai_platform.runtime.scheduler import Scheduler, SequenceRequest
from ai_platform.runtime.served_model import InProcessModel, ModelOptions
from runtime_reference import RecordingDecoder, greedy_generate

pytestmark = pytest.mark.anyio

MESSAGES = [Message("user", "Say hello to the team")]
TOKENS = 40


def test_picked_logprobs_are_the_log_softmax_of_the_raw_logits() -> None:
    logits = np.array([1.0, 3.0, 3.0, -2.0, 0.5], dtype=np.float32)
    reference = _log_softmax(logits)
    pick = picked_logprobs(logits, 4, 3)
    assert pick.token == 4 and pick.logprob == pytest.approx(reference[4], abs=1e-6)
    assert [token for token, _ in pick.top] == [1, 2, 0]  # most likely first; equal logits by id
    assert [logprob for _, logprob in pick.top] == pytest.approx(reference[[1, 2, 0]], abs=1e-6)
    assert picked_logprobs(logits, 1, 0).top == ()
    assert [token for token, _ in picked_logprobs(logits, 1, 5).top] == [1, 2, 0, 4, 3]  # k = the vocabulary
    # A token the graph masks (-inf) has OpenAI's floor, a number JSON can hold (NaN and inf it cannot).
    masked = picked_logprobs(np.array([1.0, -np.inf, np.nan], dtype=np.float32), 1, 3)
    assert masked.logprob == -9999.0 and all(np.isfinite(lp) for _, lp in masked.top)
    # A sampled token's log-probability is of the model's distribution, not of the tempered one.
    reported: list[PickedLogprobs] = []
    token = Sampling(temperature=2.0, top_p=0.5, seed=1, logprobs=2).sampler(reported.append)(logits)
    assert reported[0].token == token and reported[0].logprob == pytest.approx(reference[token], abs=1e-6)


def test_nothing_is_computed_unless_asked() -> None:
    assert Sampling(logprobs=3).sampler() is greedy_token  # nobody to report to
    assert GREEDY.sampler(lambda pick: None) is greedy_token  # not asked
    for bad in (-1, 21):
        with pytest.raises(ValueError):
            Sampling(logprobs=bad)
        with pytest.raises(ValueError):
            Generate(messages=MESSAGES, logprobs=bad)


def teacher_forced_log_probs(decoder: OnnxDecoder, prompt: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
    """log_softmax of the logits that predict each of ``tokens``, in one pass over prompt + tokens (no cache)."""
    ids = [*prompt, *tokens]
    logits, _ = decoder.forward(
        np.asarray([ids], dtype=np.int64),
        np.ones((1, len(ids)), dtype=np.int64),
        np.arange(len(ids), dtype=np.int64)[None],
        decoder.empty_past(1),
    )
    return _log_softmax(logits[0, len(prompt) - 1 : len(ids) - 1])


@pytest.fixture
async def served(tiny_model_dir: Path) -> AsyncIterator[InProcessModel]:
    model = InProcessModel.load("tiny", tiny_model_dir, ModelOptions(execution_provider="cpu", intra_op_threads=1))
    try:
        yield model
    finally:
        await model.close()


async def streamed(model: InProcessModel, *args: Any) -> tuple[list[str | Completion], list[TokenLogprob]]:
    items = [item async for item in model.stream(MESSAGES, TOKENS, *args)]
    pieces = items[:-1]
    assert all(isinstance(piece, TextDelta) for piece in pieces)
    return items, [entry for piece in pieces for entry in piece.logprobs]  # type: ignore[union-attr]


async def test_greedy_logprobs_equal_the_reference_and_list_the_chosen_token_first(
    served: InProcessModel, tiny_model: LanguageModel
) -> None:
    prompt = tiny_model.encode_prompt(MESSAGES)
    recording = RecordingDecoder(tiny_model.decoder)
    reference = greedy_generate(recording, prompt, max_new_tokens=TOKENS, eos_ids=tiny_model.eos_ids)  # type: ignore[arg-type]
    completion = await served.generate(MESSAGES, TOKENS, Sampling(logprobs=5))
    assert completion.text == tiny_model.completion(reference).text
    assert completion.logprobs is not None and len(completion.logprobs) == len(reference.tokens) == TOKENS
    for entry, token, logits in zip(completion.logprobs, reference.tokens, recording.logits, strict=False):
        expected = _log_softmax(logits)
        assert entry.logprob == pytest.approx(expected[token], abs=1e-4)
        assert (entry.token, bytes(entry.bytes)) == tiny_model.tokenizer.piece(token)
        top = [candidate.logprob for candidate in entry.top_logprobs]
        assert len(top) == 5 and top == sorted(top, reverse=True)
        assert top == pytest.approx(np.sort(expected)[::-1][:5], abs=1e-4)
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (entry.token, entry.logprob)  # greedy
    # The tokens' bytes are the text's; this answer has tokens that are parts of characters.
    partial = [entry for entry in completion.logprobs if "\ufffd" in entry.token]
    assert partial
    for entry in partial:
        with pytest.raises(UnicodeDecodeError):
            bytes(entry.bytes).decode()
    raw = b"".join(bytes(entry.bytes) for entry in completion.logprobs)
    assert raw.decode(errors="replace").strip() == completion.text
    # Not asked: none.
    assert (await served.generate(MESSAGES, TOKENS)).logprobs is None


def test_sampled_logprobs_are_of_the_model_before_temperature(tiny_model: LanguageModel) -> None:
    prompt = tiny_model.encode_prompt(MESSAGES)
    picks: list[PickedLogprobs] = []
    results: list[Generated] = []
    sampler = Sampling(temperature=1.5, top_p=0.9, seed=3, logprobs=0).sampler(picks.append)
    batch = Scheduler(ModelRunner(new_batch(tiny_model.decoder)), max_batch=2)
    batch.admit(SequenceRequest(prompt, 16, frozenset(), lambda r, e: results.append(r), sample=sampler))  # type: ignore[arg-type]
    while not results:
        batch.step()
    tokens = results[0].tokens
    assert [pick.token for pick in picks] == tokens and all(pick.top == () for pick in picks)
    expected = teacher_forced_log_probs(tiny_model.decoder, prompt, tokens)
    assert [pick.logprob for pick in picks] == pytest.approx(expected[np.arange(len(tokens)), tokens], abs=1e-4)
    assert tokens != greedy_generate(tiny_model.decoder, prompt, max_new_tokens=16, eos_ids=frozenset()).tokens


@pytest.mark.parametrize("sampling", [Sampling(logprobs=2), Sampling(temperature=1.5, seed=5, logprobs=3)])
async def test_a_stream_carries_the_completions_logprobs(served: InProcessModel, sampling: Sampling) -> None:
    completion = await served.generate(MESSAGES, TOKENS, sampling)
    items, joined = await streamed(served, sampling)
    assert joined == list(completion.logprobs or ()) and len(joined) == TOKENS
    assert items[-1] == completion
    assert "".join(str(piece) for piece in items[:-1]).strip() == completion.text


@pytest.mark.parametrize("before", ["", " "])
async def test_tokens_after_a_stop_string_are_left_out_streamed_or_not(served: InProcessModel, before: str) -> None:
    """A token whose text begins before the stop string is kept (" Every" for "Every"), one that begins at it is not."""
    full = await served.generate(MESSAGES, TOKENS, Sampling(logprobs=1))
    assert full.logprobs is not None
    word = before + next(m for m in re.finditer(r" ([A-Za-z]{4,})", full.text) if m.start() > 10)[1]
    stop = [word, "never-seen"]
    cut = await served.generate(MESSAGES, TOKENS, Sampling(logprobs=1), stop)
    assert cut.finish_reason == "stop" and cut.logprobs is not None
    kept = len(cut.logprobs)
    assert cut.logprobs == full.logprobs[:kept] and kept == cut.output_tokens - (1 if before else 0)
    starts = np.cumsum([0, *(len(entry.bytes) for entry in full.logprobs)])[:-1]
    stop_at = b"".join(bytes(entry.bytes) for entry in full.logprobs).find(word.encode())
    assert kept == int((starts < stop_at).sum())
    items, joined = await streamed(served, Sampling(logprobs=1), stop)
    assert joined == list(cut.logprobs) and items[-1] == cut
