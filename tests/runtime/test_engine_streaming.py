"""Streaming generation: text deltas as tokens are decoded, then the same Completion as generate (issue 13)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from ai_platform.operations import Completion, Generate, Message
from ai_platform.runtime.engine import InferenceEngine
from ai_platform.runtime.model import LanguageModel
from ai_platform.runtime.tokenizer import TextDeltas

pytestmark = pytest.mark.anyio

CALL = Generate(messages=[Message("user", "Summarize: the quick brown fox jumps over the lazy dog.")])


@pytest.fixture(params=["thread", "process"])
async def engine(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_model_dir: Path
) -> AsyncIterator[InferenceEngine]:
    (tmp_path / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    engine = InferenceEngine(
        tmp_path, {"op": "tiny"}, execution_provider="cpu", intra_op_threads=1, isolation=request.param
    )
    await engine.start()
    yield engine
    await engine.close()


async def test_deltas_add_up_to_the_completion_generate_gives(engine: InferenceEngine) -> None:
    items = [item async for item in engine.stream("op", CALL, max_output_tokens=40)]
    *deltas, final = items
    assert isinstance(final, Completion) and all(isinstance(d, str) and d for d in deltas)
    assert len(deltas) >= 5  # arrived one by one, not at the end
    assert "".join(deltas).strip() == final.text
    assert final == await engine.generate("op", CALL, max_output_tokens=40)
    assert engine.status()[0].queue_depth == 0


async def test_closing_a_stream_early_stops_its_generation(engine: InferenceEngine) -> None:
    stream = engine.stream("op", CALL, max_output_tokens=1500)
    first = await stream.__anext__()
    assert isinstance(first, str)
    await stream.aclose()  # the client went away
    with anyio.fail_after(5):
        while engine.status()[0].queue_depth:
            await anyio.sleep(0.01)
        # The row left the batch: a short call right after is not stuck behind 1,500 tokens.
        completion = await engine.generate("op", CALL, max_output_tokens=4)
    assert completion.output_tokens == 4


def test_a_character_split_across_tokens_waits_for_its_last_byte(tiny_model: LanguageModel) -> None:
    tokenizer = tiny_model.tokenizer
    text = "  naïve café — 東京 ok"
    tokens = tokenizer.encode(text)
    deltas = TextDeltas(tokenizer)
    pieces = [deltas.push(token) for token in tokens]
    assert "".join(pieces) == tokenizer.decode(tokens).lstrip()
    assert not any("\ufffd" in piece for piece in pieces)


def test_deltas_of_any_token_sequence_add_up_to_its_text(tiny_model: LanguageModel) -> None:
    """Token by token, the deltas so far are the start of the whole text; joined, they are all of it.

    Random ids (special tokens, bytes that never complete a character included) and real text in
    several scripts: what a model may emit, not only what the tokenizer makes of good text.
    """
    tokenizer = tiny_model.tokenizer
    rng = random.Random(7)
    texts = ["  Bonjour — 東京、مرحبا 😀👍🏽 ok", "\n\tnaïve café", "русский текст 🎉"]
    sequences = [tokenizer.encode(text) for text in texts]
    sequences += [
        [rng.randrange(tiny_model.decoder.vocab_size) for _ in range(rng.randrange(1, 80))] for _ in range(200)
    ]
    for tokens in sequences:
        deltas = TextDeltas(tokenizer)
        shown = ""
        for count, token in enumerate(tokens, 1):
            shown += deltas.push(token)
            text = tokenizer.decode(tokens[:count]).lstrip()
            assert text.startswith(shown), (tokens[:count], shown, text)
            if not text.endswith("\ufffd"):
                assert shown == text, (tokens[:count], shown, text)
