"""Error paths of the continuous batch and its worker thread, on the tiny model.

A sequence cancelled while its prompt is still being prefilled, a prefill or a join that
raises, shutdown with sequences decoding and prefilling, and a request cancelled while it
still waits in the queue: each ends exactly that sequence, with the right error, and
leaves the batch serving the others exactly as if nothing had happened.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence

import anyio
import numpy as np
import pytest
from test_batching import Outcomes

from ai_platform.errors import ModelUnavailableError
from ai_platform.operations import Message
from ai_platform.runtime import generation
from ai_platform.runtime.engine_loop import EngineLoop
from ai_platform.runtime.generation import Generated, GenerationCancelled
from ai_platform.runtime.kv_batch import DecodeBatch, Prefill, new_batch
from ai_platform.runtime.model import LanguageModel
from ai_platform.runtime.model_runner import ModelRunner
from ai_platform.runtime.scheduler import Scheduler, SequenceRequest
from runtime_reference import greedy_generate

CHUNK = 4  # prompt tokens per prefill step in these tests: a prompt takes many steps
NO_EOS: frozenset[int] = frozenset()
BUDGET = 150  # new tokens of the sequence that decodes throughout: more steps than any prefill here


@pytest.fixture(autouse=True)
def small_prefill_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generation, "PREFILL_CHUNK", CHUNK)


def encode(model: LanguageModel, text: str) -> list[int]:
    return model.encode_prompt([Message("user", text)])


@pytest.fixture(scope="module")
def short_prompt(tiny_model: LanguageModel) -> list[int]:
    return encode(tiny_model, "Hi.")


@pytest.fixture(scope="module")
def long_prompt(tiny_model: LanguageModel) -> list[int]:
    prompt = encode(tiny_model, "Summarize: " + "the quarterly report, the office in Paris and the new hires. " * 4)
    assert len(prompt) > 10 * CHUNK  # many prefill steps
    return prompt


def alone(model: LanguageModel, prompt: Sequence[int], budget: int) -> Generated:
    return greedy_generate(model.decoder, prompt, max_new_tokens=budget, eos_ids=NO_EOS)


def step_until(batch: Scheduler, condition: Callable[[], bool], *, most: int = 2000) -> None:
    """Step until ``condition()``; a batch that never gets there fails instead of hanging."""
    for _ in range(most):
        if condition():
            return
        batch.step()
    raise AssertionError(f"not reached after {most} steps")


class Faulty:
    """A real DecodeBatch whose prefill (after its first chunk) or join fails for chosen prompt lengths."""

    def __init__(self, inner: DecodeBatch, *, fail_prefill: Sequence[int] = (), fail_join: Sequence[int] = ()) -> None:
        self.inner = inner
        self.fail_prefill = set(fail_prefill)
        self.fail_join = set(fail_join)
        self.joined: list[int] = []  # prompt length of every sequence that joined

    @property
    def size(self) -> int:
        return self.inner.size

    def prefill(self, prompt: Sequence[int]) -> Prefill:
        chunks = self.inner.prefill(prompt)
        return self._failing(chunks) if len(prompt) in self.fail_prefill else chunks

    @staticmethod
    def _failing(chunks: Prefill) -> Prefill:
        next(chunks)  # the first chunk runs for real
        yield
        raise RuntimeError("onnxruntime failed in prefill")

    def join(self, past: list[np.ndarray]) -> None:
        length = past[0].shape[2]
        if length in self.fail_join:
            raise RuntimeError("could not grow the KV buffers")
        self.inner.join(past)
        self.joined.append(length)

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        return self.inner.step(tokens)

    def remove(self, row: int) -> None:
        self.inner.remove(row)


def start_decoding(batch: Scheduler, outcomes: Outcomes, prompt: Sequence[int], budget: int) -> SequenceRequest:
    request = outcomes.request("decoding", prompt, budget)
    batch.admit(request)
    step_until(batch, lambda: bool(request.tokens))
    return request


# -- Scheduler ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks_before_cancel", [0, 1, 3])
def test_a_sequence_cancelled_while_prefilling_leaves_without_joining(
    tiny_model: LanguageModel, short_prompt: list[int], long_prompt: list[int], chunks_before_cancel: int
) -> None:
    outcomes = Outcomes()
    kv = Faulty(new_batch(tiny_model.decoder))
    batch = Scheduler(ModelRunner(kv), max_batch=4)  # type: ignore[arg-type]
    decoding = start_decoding(batch, outcomes, short_prompt, BUDGET)
    arriving = outcomes.request("arriving", long_prompt, 10)
    batch.admit(arriving)
    for _ in range(chunks_before_cancel):
        batch.step()
    assert not outcomes.done("arriving") and batch.active == 2  # still prefilling
    arriving.cancelled.set()
    batch.step()
    assert isinstance(outcomes.errors.get("arriving"), GenerationCancelled)
    assert batch.active == 1 and kv.size == 1 and kv.joined == [len(short_prompt)]  # it never joined
    step_until(batch, lambda: outcomes.done("decoding"))
    assert outcomes.results["decoding"] == alone(tiny_model, short_prompt, BUDGET)
    assert batch.active == 0 and kv.size == 0
    assert decoding.tokens == outcomes.results["decoding"].tokens


def test_a_failing_prefill_fails_only_its_sequence(
    tiny_model: LanguageModel, short_prompt: list[int], long_prompt: list[int]
) -> None:
    outcomes = Outcomes()
    kv = Faulty(new_batch(tiny_model.decoder), fail_prefill=[len(long_prompt)])
    batch = Scheduler(ModelRunner(kv), max_batch=4)  # type: ignore[arg-type]
    start_decoding(batch, outcomes, short_prompt, BUDGET)
    batch.admit(outcomes.request("broken", long_prompt, 10))
    step_until(batch, lambda: outcomes.done("broken"))
    error = outcomes.errors["broken"]
    assert isinstance(error, RuntimeError) and str(error) == "onnxruntime failed in prefill"
    assert batch.active == 1 and kv.size == 1  # the decoding one goes on alone
    # The batch keeps serving: a new sequence joins, and both produce exactly what they produce alone.
    other = encode(tiny_model, "Translate: good morning, everyone.")
    batch.admit(outcomes.request("next", other, 12))
    step_until(batch, lambda: outcomes.done("decoding", "next"))
    assert outcomes.results["decoding"] == alone(tiny_model, short_prompt, BUDGET)
    assert outcomes.results["next"] == alone(tiny_model, other, 12)
    assert batch.active == 0 and kv.size == 0 and "broken" not in outcomes.results


def test_a_failing_join_fails_only_its_sequence(
    tiny_model: LanguageModel, short_prompt: list[int], long_prompt: list[int]
) -> None:
    outcomes = Outcomes()
    kv = Faulty(new_batch(tiny_model.decoder), fail_join=[len(long_prompt)])
    batch = Scheduler(ModelRunner(kv), max_batch=4)  # type: ignore[arg-type]
    start_decoding(batch, outcomes, short_prompt, BUDGET)
    batch.admit(outcomes.request("broken", long_prompt, 10))
    step_until(batch, lambda: outcomes.done("broken"))
    error = outcomes.errors["broken"]
    assert isinstance(error, RuntimeError) and str(error) == "could not grow the KV buffers"
    assert batch.active == 1 and kv.size == 1 and kv.joined == [len(short_prompt)]
    other = encode(tiny_model, "Translate: good morning, everyone.")
    batch.admit(outcomes.request("next", other, 12))
    step_until(batch, lambda: outcomes.done("decoding", "next"))
    assert outcomes.results["decoding"] == alone(tiny_model, short_prompt, BUDGET)
    assert outcomes.results["next"] == alone(tiny_model, other, 12)
    assert batch.active == 0 and kv.size == 0


def test_fail_all_ends_decoding_and_prefilling_sequences(
    tiny_model: LanguageModel, short_prompt: list[int], long_prompt: list[int]
) -> None:
    outcomes = Outcomes()
    kv = Faulty(new_batch(tiny_model.decoder))
    batch = Scheduler(ModelRunner(kv), max_batch=4)  # type: ignore[arg-type]
    start_decoding(batch, outcomes, short_prompt, BUDGET)
    batch.admit(outcomes.request("prefilling", long_prompt, 10))
    batch.step()
    assert batch.active == 2 and kv.size == 1
    shutdown = ModelUnavailableError("Model 'm' is shutting down.")
    batch.fail_all(shutdown)
    assert outcomes.errors == {"decoding": shutdown, "prefilling": shutdown} and not outcomes.results
    assert batch.active == 0 and kv.size == 0


# -- EngineLoop --------------------------------------------------------------------------------


class WatchedScheduler(Scheduler):
    """A Scheduler that records admitted requests and can hold its thread after a step."""

    def __init__(self, model: LanguageModel, hold_when: Callable[[WatchedScheduler], bool] = lambda b: False) -> None:
        super().__init__(ModelRunner(new_batch(model.decoder)), max_batch=8)
        self.admitted: list[SequenceRequest] = []
        self.hold_when = hold_when
        self.held = threading.Event()
        self.resume = threading.Event()

    def admit(self, request: SequenceRequest) -> None:
        self.admitted.append(request)
        super().admit(request)

    def step(self) -> None:
        super().step()
        if not self.held.is_set() and self.hold_when(self):
            self.held.set()
            self.resume.wait(30)


async def until(condition: Callable[[], bool], seconds: float = 10) -> None:
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.sleep(0.001)


@pytest.mark.anyio
async def test_close_fails_decoding_and_prefilling_sequences(
    tiny_model: LanguageModel, short_prompt: list[int], long_prompt: list[int]
) -> None:
    def decoding_and_prefilling(batch: WatchedScheduler) -> bool:
        return len(batch.admitted) == 2 and bool(batch.admitted[0].tokens) and not batch.admitted[1].tokens

    batch = WatchedScheduler(tiny_model, hold_when=decoding_and_prefilling)
    worker = EngineLoop("m", max_queue=4, scheduler=batch)
    decoding = asyncio.ensure_future(worker.generate(short_prompt, 500, NO_EOS))
    await until(lambda: len(batch.admitted) == 1 and bool(batch.admitted[0].tokens))
    prefilling = asyncio.ensure_future(worker.generate(long_prompt, 10, NO_EOS))
    await anyio.to_thread.run_sync(batch.held.wait, 10)  # the thread waits after a step: one decodes, one prefills
    assert batch.active == worker.queue_depth == 2
    closing = asyncio.ensure_future(worker.close())
    await asyncio.sleep(0)  # close() marks the worker closed before its first await
    batch.resume.set()
    with anyio.fail_after(10):  # without fail_all at shutdown, the callers would wait forever
        await closing
        outcomes = await asyncio.gather(decoding, prefilling, return_exceptions=True)
    for outcome in outcomes:
        assert isinstance(outcome, ModelUnavailableError), outcome
        assert outcome.detail == "Model 'm' is shutting down."
    assert batch.active == 0 and worker.queue_depth == 0


@pytest.mark.anyio
async def test_a_request_cancelled_in_the_queue_never_reaches_the_batch(
    tiny_model: LanguageModel, short_prompt: list[int], long_prompt: list[int]
) -> None:
    batch = WatchedScheduler(tiny_model)
    worker = EngineLoop("m", max_queue=4, scheduler=batch)
    started, release = threading.Event(), threading.Event()

    def occupy(should_stop: Callable[[], bool]) -> None:  # a job runs alone: sequences behind it wait
        started.set()
        release.wait(30)

    busy = asyncio.ensure_future(worker.run(occupy))
    await anyio.to_thread.run_sync(started.wait, 10)
    waiting = asyncio.ensure_future(worker.generate(long_prompt, 10, NO_EOS))
    await until(lambda: worker.queue_depth == 2)  # one job running, one sequence waiting
    waiting.cancel()
    await until(lambda: worker.queue_depth == 1)  # it left the queue at once, not when the job ends
    release.set()
    await busy
    result = await worker.generate(short_prompt, 6, NO_EOS)
    assert result == alone(tiny_model, short_prompt, 6)
    assert waiting.cancelled()
    assert [r.prompt for r in batch.admitted] == [short_prompt]  # the cancelled one was never admitted
    assert worker.queue_depth == 0
    await worker.close()
