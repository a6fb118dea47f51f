"""A model's decode batch stays within its memory: buffers grow only as needed, admission by KV bytes.

A soak run (issue 10) ended in the model process being OOM-killed at 23 GB: every time
the rows had to grow longer, ``SharedBufferBatch`` also doubled its row count, so 7
sequences held 64 rows of buffers (and each growth kept old and new caches at once).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from test_batching import Outcomes, alone, run_until_done

from ai_platform.operations import Message
from ai_platform.runtime import kv_batch
from ai_platform.runtime.engine_loop import EngineLoop
from ai_platform.runtime.kv_batch import Prefill, SharedBufferBatch, new_batch
from ai_platform.runtime.model import LanguageModel
from ai_platform.runtime.model_runner import ModelRunner
from ai_platform.runtime.scheduler import Scheduler, SequenceRequest


def encode(model: LanguageModel, count: int) -> list[list[int]]:
    return [model.encode_prompt([Message("user", f"Item {i}: " + "more words " * i)]) for i in range(count)]


class Recording(SharedBufferBatch):
    """Records the buffers' shape after every step."""

    shapes: list[tuple[int, ...]]

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        logits = super().step(tokens)
        self.shapes.append(self._buffers[0].shape)
        return logits


def test_longer_rows_keep_the_row_count_and_decode_exactly(
    tiny_genai_model: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kv_batch, "LENGTH_STEP", 8)  # many length growths in a short generation
    model = tiny_genai_model
    shared = Recording(model.decoder, max_rows=16)
    shared.shapes = []
    batch = Scheduler(ModelRunner(shared), max_batch=16)
    outcomes = Outcomes()
    prompts = encode(model, 7)
    for index, prompt in enumerate(prompts):
        batch.admit(outcomes.request(str(index), prompt, 40))
    run_until_done(batch, outcomes, len(prompts))
    assert outcomes.results == {str(i): alone(model, p, 40) for i, p in enumerate(prompts)}
    lengths = sorted({shape[2] for shape in shared.shapes})
    assert len(lengths) > 5, lengths  # the rows grew longer many times ...
    assert (
        max(shape[0] for shape in shared.shapes) == 8
    )  # ... but 7 rows never took more than 8 (they doubled with each growth)


def test_spare_rows_stay_within_max_bytes(tiny_genai_model: LanguageModel) -> None:
    model = tiny_genai_model
    prompts = encode(model, 5)
    length = kv_batch.LENGTH_STEP  # every sequence here fits in one length step
    per_row = length * SharedBufferBatch(model.decoder).bytes_per_position
    shared = Recording(model.decoder, max_bytes=5 * per_row)
    shared.shapes = []
    batch = Scheduler(ModelRunner(shared), max_batch=16)
    outcomes = Outcomes()
    for index, prompt in enumerate(prompts):
        batch.admit(outcomes.request(str(index), prompt, 6))
    run_until_done(batch, outcomes, len(prompts))
    # Doubling would give 8 rows once the fifth joins; 5 are all max_bytes affords.
    assert [shape[0] for shape in shared.shapes][-1] == 5
    assert outcomes.results == {str(i): alone(model, p, 6) for i, p in enumerate(prompts)}


class Counted:
    """A decode batch that only answers ``bytes_per_position`` (admission is decided before any work)."""

    bytes_per_position = 10
    size = 0

    def prefill(self, prompt: Sequence[int]) -> Prefill:
        raise AssertionError("not called")
        yield


def request(prompt_tokens: int, budget: int) -> SequenceRequest:
    return SequenceRequest([1] * prompt_tokens, budget, frozenset(), lambda result, error: None)


def test_admission_counts_every_row_at_the_longest_length() -> None:
    batch = Scheduler(ModelRunner(Counted()), max_batch=8, max_kv_bytes=10 * 3 * 100)  # type: ignore[arg-type]
    first = request(60, 40)  # may grow to 100 positions
    assert batch.can_admit(first)
    assert batch.can_admit(request(10, 10), [first, request(50, 50)])  # 3 rows x 100
    assert not batch.can_admit(request(10, 10), [first, request(50, 50), request(1, 1)])  # 4 rows x 100
    assert not batch.can_admit(request(60, 41), [first, request(1, 1)])  # 3 rows x 101
    # Alone, a sequence runs whatever it needs; rows still count.
    assert batch.can_admit(request(5000, 5000))
    no_memory_bound = Scheduler(ModelRunner(Counted()), max_batch=2)  # type: ignore[arg-type]
    assert not no_memory_bound.can_admit(request(1, 1), [first, request(1, 1)])


@pytest.mark.anyio
async def test_generations_beyond_the_kv_budget_wait_and_then_decode_exactly(tiny_genai_model: LanguageModel) -> None:
    import anyio

    model = tiny_genai_model
    prompts = encode(model, 6)
    budget = 12
    longest = max(len(p) for p in prompts) + budget
    decode = new_batch(model.decoder)
    # Room for two rows at the longest length: the other four wait in the queue, none is refused.
    batch = Scheduler(ModelRunner(decode), max_batch=16, max_kv_bytes=2 * longest * decode.bytes_per_position)
    worker = EngineLoop("tiny", max_queue=16, scheduler=batch)
    most = 0
    step = batch.step

    def counting_step() -> None:
        nonlocal most
        most = max(most, batch.active)
        step()

    batch.step = counting_step  # type: ignore[method-assign]
    results: dict[int, object] = {}

    async def one(index: int) -> None:
        results[index] = await worker.generate(prompts[index], budget, frozenset())

    try:
        async with anyio.create_task_group() as group:
            for index in range(len(prompts)):
                group.start_soon(one, index)
    finally:
        await worker.close()
    assert most == 2
    assert results == {i: alone(model, p, budget) for i, p in enumerate(prompts)}
