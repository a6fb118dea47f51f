"""Continuous batching: sequences that share decode steps produce exactly what each produces alone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

from ai_platform.operations import Generate, Message
from ai_platform.runtime import generation
from ai_platform.runtime.engine import InferenceEngine
from ai_platform.runtime.generation import Generated, GenerationCancelled
from ai_platform.runtime.kv_batch import DecodeBatch, new_batch
from ai_platform.runtime.model import LanguageModel
from ai_platform.runtime.model_runner import ModelRunner
from ai_platform.runtime.prefix_cache import PrefixCache
from ai_platform.runtime.scheduler import Scheduler, SequenceRequest
from runtime_reference import greedy_generate, score_options

TOPICS = ("the fox", "quarterly earnings and the new office in Paris", "a", "12 x 12 = 144, 7 + 8 = 15", "usage")


class Outcomes:
    """Collects each request's result or error by name."""

    def __init__(self) -> None:
        self.results: dict[str, Generated] = {}
        self.errors: dict[str, BaseException] = {}

    def request(
        self, name: str, prompt: Sequence[int], budget: int, eos: frozenset[int] = frozenset()
    ) -> SequenceRequest:
        def finish(result: Generated | None, error: BaseException | None) -> None:
            assert name not in self.results and name not in self.errors, f"{name} finished twice"
            if error is not None:
                self.errors[name] = error
            else:
                assert result is not None
                self.results[name] = result

        return SequenceRequest(prompt, budget, eos, finish)

    def done(self, *names: str) -> bool:
        return all(name in self.results or name in self.errors for name in names)


def prompts(model: LanguageModel) -> list[list[int]]:
    encoded = [model.encode_prompt([Message("user", f"Summarize: {topic}.")]) for topic in TOPICS]
    assert len({len(p) for p in encoded}) > 2  # rows of different lengths share steps
    return encoded


def run_until_done(batch: Scheduler, outcomes: Outcomes, total: int) -> None:
    while len(outcomes.results) + len(outcomes.errors) < total:
        batch.step()


def alone(model: LanguageModel, prompt: list[int], budget: int, eos: frozenset[int] = frozenset()) -> Generated:
    return greedy_generate(model.decoder, prompt, max_new_tokens=budget, eos_ids=eos)


def test_staggered_batch_equals_each_sequence_alone(any_model: LanguageModel) -> None:
    tiny_model = any_model
    encoded = prompts(tiny_model)
    budgets = [30, 12, 25, 5, 18]
    # One sequence stops on an eos token the model produces after a few steps of its own.
    free = alone(tiny_model, encoded[0], 30).tokens
    eos = frozenset({next(token for k, token in enumerate(free) if k >= 4 and token not in free[:k])})
    outcomes = Outcomes()
    batch = Scheduler(ModelRunner(new_batch(tiny_model.decoder)), max_batch=8)
    for index, (prompt, budget) in enumerate(zip(encoded, budgets, strict=True)):
        batch.admit(outcomes.request(str(index), prompt, budget, eos if index == 0 else frozenset()))
        for _ in range(3):  # later sequences join a batch that is already decoding
            batch.step()
    run_until_done(batch, outcomes, len(encoded))
    assert batch.active == 0 and not outcomes.errors
    for index, (prompt, budget) in enumerate(zip(encoded, budgets, strict=True)):
        expected = alone(tiny_model, prompt, budget, eos if index == 0 else frozenset())
        assert outcomes.results[str(index)] == expected, f"sequence {index}"
    assert outcomes.results["0"].finish_reason == "stop"
    assert outcomes.results["1"].finish_reason == "length"


def test_cancelling_one_sequence_leaves_the_others_intact(any_model: LanguageModel) -> None:
    tiny_model = any_model
    encoded = prompts(tiny_model)[:3]
    outcomes = Outcomes()
    batch = Scheduler(ModelRunner(new_batch(tiny_model.decoder)), max_batch=8)
    requests = [outcomes.request(str(i), prompt, 20) for i, prompt in enumerate(encoded)]
    for request in requests:
        batch.admit(request)
    batch.step()
    requests[0].cancelled.set()  # the first row leaves; the last row moves into its place
    batch.step()
    assert isinstance(outcomes.errors["0"], GenerationCancelled) and batch.active == 2
    run_until_done(batch, outcomes, 3)
    for index in (1, 2):
        assert outcomes.results[str(index)] == alone(tiny_model, encoded[index], 20)


def test_a_failing_step_fails_only_the_active_sequences(tiny_model: LanguageModel) -> None:
    class Broken:
        def __init__(self, inner: DecodeBatch) -> None:
            self.inner = inner
            self.size = 0

        def prefill(self, prompt: list[int]) -> object:
            return self.inner.prefill(prompt)

        def join(self, past: list[object]) -> None:
            self.inner.join(past)  # type: ignore[arg-type]

        def step(self, tokens: list[int]) -> object:
            raise RuntimeError("onnxruntime failed")

        def remove(self, row: int) -> None:
            self.inner.remove(row)

    outcomes = Outcomes()
    batch = Scheduler(ModelRunner(Broken(new_batch(tiny_model.decoder))), max_batch=8)  # type: ignore[arg-type]
    encoded = prompts(tiny_model)
    batch.admit(outcomes.request("a", encoded[0], 5))
    batch.step()  # prefills "a"
    batch.step()  # its first decode step fails
    assert isinstance(outcomes.errors["a"], RuntimeError) and batch.active == 0
    batch.admit(outcomes.request("b", encoded[1], 0))
    assert outcomes.results["b"] == Generated([], "length")


@pytest.mark.anyio
async def test_concurrent_engine_calls_share_steps_and_match_unbatched(
    tiny_model_dir: Path, tmp_path: Path, tiny_model: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path
    (models / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    engine = InferenceEngine(
        models, {"summarize": "tiny"}, execution_provider="cpu", intra_op_threads=1, isolation="thread"
    )
    await engine.start()
    sizes: list[int] = []
    step = Scheduler.step

    def counting_step(self: Scheduler) -> None:
        sizes.append(self.active)
        step(self)

    monkeypatch.setattr(Scheduler, "step", counting_step)
    results: dict[int, str] = {}

    async def call(index: int) -> None:
        messages = [Message("user", f"Summarize: {TOPICS[index]}.")]
        completion = await engine.generate("summarize", Generate(messages=messages), max_output_tokens=24)
        results[index] = completion.text

    async with anyio.create_task_group() as tg:
        for index in range(len(TOPICS)):
            tg.start_soon(call, index)
    await engine.close()
    assert max(sizes) > 1, "the calls never shared a decode step"
    for index, topic in enumerate(TOPICS):
        prompt = tiny_model.encode_prompt([Message("user", f"Summarize: {topic}.")])
        assert results[index] == tiny_model.completion(alone(tiny_model, prompt, 24)).text


def test_prompts_sharing_a_prefix_reuse_its_kv_and_decode_the_same(any_model: LanguageModel) -> None:
    encoded = prompts(any_model)  # the chat template and "Summarize: " come first in each
    shared = min(next(i for i, (a, b) in enumerate(zip(p, encoded[0], strict=False)) if a != b) for p in encoded[1:])
    cache = PrefixCache()
    outcomes = Outcomes()
    batch = Scheduler(ModelRunner(new_batch(any_model.decoder, cache)), max_batch=8)
    for index, prompt in enumerate(encoded):
        batch.admit(outcomes.request(str(index), prompt, 12))
        batch.step()
    run_until_done(batch, outcomes, len(encoded))
    assert cache.hits == len(encoded) - 1 and cache.reused_tokens >= shared * (len(encoded) - 1)
    for index, prompt in enumerate(encoded):
        assert outcomes.results[str(index)] == alone(any_model, prompt, 12), f"sequence {index}"
    # Option scoring reuses the same cache: same scores as scoring from scratch.
    options = [[5, 6, any_model.end_of_turn_id], [7, any_model.end_of_turn_id]]
    cold = score_options(any_model.decoder, encoded[1], options)
    assert score_options(any_model.decoder, encoded[1], options, cache=cache) == pytest.approx(cold, rel=1e-5)


def test_a_long_prompt_is_prefilled_a_chunk_per_step_while_the_others_decode(
    any_model: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 4)
    short, long = prompts(any_model)[2], prompts(any_model)[1]
    outcomes = Outcomes()
    batch = Scheduler(ModelRunner(new_batch(any_model.decoder)), max_batch=8)
    decoding = outcomes.request("short", short, 40)
    batch.admit(decoding)
    while not decoding.tokens:
        batch.step()  # its own prompt, a chunk per step, then its first token
    arriving = outcomes.request("long", long, 10)
    batch.admit(arriving)
    for _ in range(-(-len(long) // 4) - 1):  # every chunk of the long prompt but the last
        before = len(decoding.tokens)
        batch.step()
        assert len(decoding.tokens) == before + 1 and not arriving.tokens
    run_until_done(batch, outcomes, 2)
    assert outcomes.results["long"] == alone(any_model, long, 10)
    assert outcomes.results["short"] == alone(any_model, short, 40)
