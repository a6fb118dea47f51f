"""InferenceEngine on the tiny model: loading, status, calls, errors, concurrency."""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Collection, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import onnxruntime as ort
import pytest

from ai_platform.engine_contract import PromptTooLongError
from ai_platform.errors import ConfigurationError, ModelUnavailableError
from ai_platform.operations import Choice, Choose, Completion, Generate, Message
from ai_platform.runtime.engine import InferenceEngine
from ai_platform.runtime.model import LanguageModel
from ai_platform.runtime.onnx_model import OnnxDecoder
from runtime_reference import greedy_generate

pytestmark = pytest.mark.anyio

OPERATIONS = {"summarize": "tiny", "classify": "tiny-alias", "translate": "missing"}
MESSAGES = [Message("user", "Summarize: the quick brown fox jumps over the lazy dog.")]

# Where the engine runs its models, where it has a choice: "thread" (this process; what the tests
# that patch the runtime need) and "process" (a supervised child process, the default).
ISOLATIONS = ["thread", "process"] if "isolation" in inspect.signature(InferenceEngine).parameters else [None]
IN_THIS_PROCESS = {"isolation": "thread"} if ISOLATIONS != [None] else {}


def reference(model: LanguageModel, messages: Sequence[Message], limit: int) -> Completion:
    """The completion an unbatched greedy decode of the same prompt gives, in this process."""
    prompt = model.encode_prompt(messages)
    generated = greedy_generate(
        model.decoder, prompt, max_new_tokens=model.budget(prompt, limit), eos_ids=model.eos_ids
    )
    return model.completion(generated)


def reference_choice(model: LanguageModel, messages: Sequence[Message], options: list[str]) -> Choice:
    prompt, answers = model.encode_choice(messages, options)
    return model.choose(prompt, answers, options, lambda: False)


@pytest.fixture
def models_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    (tmp_path / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    (tmp_path / "tiny-alias").symlink_to(tmp_path / "tiny", target_is_directory=True)
    return tmp_path


@pytest.fixture
async def engine(models_dir: Path) -> AsyncIterator[InferenceEngine]:
    """The engine with its models in this process, where tests can patch the runtime."""
    engine = InferenceEngine(models_dir, OPERATIONS, execution_provider="cpu", intra_op_threads=1, **IN_THIS_PROCESS)
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture(params=ISOLATIONS)
async def any_engine(models_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[InferenceEngine]:
    """The engine with each isolation it offers, in turn."""
    isolation = {} if request.param is None else {"isolation": request.param}
    engine = InferenceEngine(models_dir, OPERATIONS, execution_provider="cpu", intra_op_threads=1, **isolation)
    await engine.start()
    yield engine
    await engine.close()


class SlowForward:
    """Wraps OnnxDecoder.forward: sleeps per pass, counts passes, and never lets eos win."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, eos_ids: Collection[int], delay: float) -> None:
        self.calls = 0
        self.windows: list[tuple[float, float]] = []
        self._forward = OnnxDecoder.forward
        self._eos = list(eos_ids)
        self._delay = delay
        monkeypatch.setattr(OnnxDecoder, "forward", self)

    def __get__(self, decoder: OnnxDecoder, owner: type) -> object:
        return lambda *args, **kwargs: self(decoder, *args, **kwargs)

    def __call__(self, decoder: OnnxDecoder, *args: Any, **kwargs: Any) -> tuple[np.ndarray, list[np.ndarray]]:
        self.calls += 1
        start = time.monotonic()
        time.sleep(self._delay)
        logits, present = self._forward(decoder, *args, **kwargs)
        logits[..., self._eos] = -np.inf
        self.windows.append((start, time.monotonic()))
        return logits, present

    async def wait_for_calls(self, count: int) -> None:
        with anyio.fail_after(5):
            while self.calls < count:
                await anyio.sleep(0.001)


async def test_status_reports_every_operation(engine: InferenceEngine, models_dir: Path) -> None:
    status = {s.operation: s for s in engine.status()}
    assert list(status) == list(OPERATIONS)
    assert status["summarize"].loaded and status["summarize"].provider == "CPUExecutionProvider"
    assert status["summarize"].path == str(models_dir / "tiny")
    assert status["classify"].loaded and status["classify"].path == str(models_dir / "tiny-alias")
    assert status["classify"].model == engine.model_name("classify") == "tiny-alias"
    assert not status["translate"].loaded and status["translate"].provider is None
    assert status["translate"].error == "model folder not found"


async def test_symlinked_folders_share_one_session(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[Path] = []
    original = LanguageModel.load

    def counting_load(folder: Path, **kwargs: object) -> LanguageModel:
        loads.append(folder)
        return original(folder, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LanguageModel, "load", counting_load)
    operations = {"summarize": "tiny", "classify": "tiny-alias"}
    engine = InferenceEngine(models_dir, operations, execution_provider="cpu", **IN_THIS_PROCESS)  # sees the patch
    await engine.start()
    assert loads == [models_dir / "tiny"]
    assert all(s.loaded for s in engine.status())
    await engine.close()


async def test_generate_is_the_reference_decode_within_the_final_token_cap(
    any_engine: InferenceEngine, tiny_model: LanguageModel
) -> None:
    # max_output_tokens is the final cap (the orchestrator folded the call's own limit into it): the
    # engine does not apply call.max_output_tokens again.
    for call_limit, limit in ((None, 5), (3, 5), (50, 3)):
        completion = await any_engine.generate(
            "summarize", Generate(messages=MESSAGES, max_output_tokens=call_limit), max_output_tokens=limit
        )
        expected = reference(tiny_model, MESSAGES, limit)
        # The tiny model never says eos on this prompt: the limit ends it, with real tokens.
        assert (expected.output_tokens, expected.finish_reason) == (limit, "length") and expected.text
        assert completion == expected


async def test_choose_returns_the_reference_probabilities_in_option_order(
    any_engine: InferenceEngine, tiny_model: LanguageModel
) -> None:
    options = ["technical", "billing", "technical"]  # a duplicate counts once
    choice = await any_engine.choose("classify", Choose(messages=MESSAGES, options=options))
    expected = reference_choice(tiny_model, MESSAGES, ["technical", "billing"])
    assert list(choice.scores) == ["technical", "billing"]
    assert choice.scores == pytest.approx(expected.scores, rel=1e-5, abs=1e-9)
    assert max(expected.scores.values()) - min(expected.scores.values()) > 1e-4  # the comparison can tell them apart
    assert sum(choice.scores.values()) == pytest.approx(1.0, abs=1e-9)
    assert choice.best == expected.best and choice.output_tokens == expected.output_tokens
    _, answers = tiny_model.encode_choice(MESSAGES, [choice.best])
    assert choice.output_tokens == len(answers[0])


async def test_missing_model_is_unavailable_while_others_work(
    any_engine: InferenceEngine, tiny_model: LanguageModel
) -> None:
    with pytest.raises(
        ModelUnavailableError, match=r"'missing' for operation 'translate' is not available; retry later\.$"
    ):
        await any_engine.generate("translate", Generate(messages=MESSAGES), max_output_tokens=5)
    with pytest.raises(ModelUnavailableError, match="No model is configured"):
        await any_engine.choose("unknown", Choose(messages=MESSAGES, options=["a", "b"]))
    completion = await any_engine.generate("summarize", Generate(messages=MESSAGES), max_output_tokens=2)
    assert completion == reference(tiny_model, MESSAGES, 2) and completion.output_tokens == 2


async def test_input_beyond_the_context_window_is_rejected(engine: InferenceEngine, tiny_model: LanguageModel) -> None:
    context = tiny_model.decoder.max_positions
    long = [Message("user", "Hello world! " * context)]
    with pytest.raises(PromptTooLongError) as raised:
        await engine.generate("summarize", Generate(messages=long), max_output_tokens=5)
    assert raised.value.tokens > context and raised.value.most == context - 1  # one position left to answer
    assert "context window" in str(raised.value) and f"at most {context - 1})" in str(raised.value)
    with pytest.raises(PromptTooLongError):
        await engine.choose("classify", Choose(messages=long, options=["a", "b"]))


async def test_check_counts_prompt_tokens_before_any_model_work(
    any_engine: InferenceEngine, tiny_model: LanguageModel
) -> None:
    """``check`` tokenises in the server's process (whatever the isolation) and raises what the call would."""
    assert await any_engine.check("summarize", Generate(messages=MESSAGES)) == len(tiny_model.encode_prompt(MESSAGES))
    options = ["billing", "technical support"]
    expected, _ = tiny_model.encode_choice(MESSAGES, options)
    assert await any_engine.check("classify", Choose(messages=MESSAGES, options=options)) == len(expected)
    long = [Message("user", "Hello world! " * tiny_model.decoder.max_positions)]
    with pytest.raises(PromptTooLongError, match="context window"):
        await any_engine.check("summarize", Generate(messages=long))
    with pytest.raises(ModelUnavailableError):
        await any_engine.check("translate", Generate(messages=MESSAGES))
    assert all(status.queue_depth == 0 for status in any_engine.status())


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
async def test_cuda_without_cuda_fails_to_load_with_a_clear_error(models_dir: Path) -> None:
    engine = InferenceEngine(models_dir, {"summarize": "tiny"}, execution_provider="cuda")
    await engine.start()
    [status] = engine.status()
    assert not status.loaded
    assert status.error is not None and "CUDAExecutionProvider is not available" in status.error
    await engine.close()


def test_invalid_settings_are_rejected(models_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="execution provider"):
        InferenceEngine(models_dir, {}, execution_provider="tpu")
    with pytest.raises(ConfigurationError, match="max_queue"):
        InferenceEngine(models_dir, {}, max_queue=0)


async def test_generate_does_not_block_the_event_loop(
    engine: InferenceEngine, tiny_model: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowForward(monkeypatch, tiny_model.eos_ids, delay=0.02)
    ticks: list[float] = []

    async def tick() -> None:
        while True:
            ticks.append(time.monotonic())
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        await engine.generate("summarize", Generate(messages=MESSAGES), max_output_tokens=4)
        tg.cancel_scope.cancel()
    assert slow.calls == 4
    for start, end in slow.windows:
        assert any(start < t < end for t in ticks), "the event loop stalled during a forward pass"


async def test_cancelling_a_running_generation_stops_it(
    engine: InferenceEngine, tiny_model: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = reference(tiny_model, MESSAGES, 2)
    slow = SlowForward(monkeypatch, tiny_model.eos_ids, delay=0.01)
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(engine.generate, "summarize", Generate(messages=MESSAGES), max_output_tokens=200))
        await slow.wait_for_calls(3)
        assert {s.operation: s.queue_depth for s in engine.status()}["summarize"] == 1
        tg.cancel_scope.cancel()
    calls_at_cancel = slow.calls
    with anyio.fail_after(5):  # the sequence leaves the batch at its next step, freeing its row
        while engine.status()[0].queue_depth:
            await anyio.sleep(0.001)
    completion = await engine.generate("summarize", Generate(messages=MESSAGES), max_output_tokens=2)
    assert completion == expected
    assert slow.calls <= calls_at_cancel + 1 + 2  # at most the step in flight, then the new call's two


async def test_close_makes_models_unavailable(models_dir: Path) -> None:
    engine = InferenceEngine(models_dir, {"summarize": "tiny"}, execution_provider="cpu")
    await engine.start()
    await engine.close()
    [status] = engine.status()
    assert not status.loaded and status.error == "engine closed"
    with pytest.raises(ModelUnavailableError):
        await engine.generate("summarize", Generate(messages=MESSAGES), max_output_tokens=2)


async def test_corrupt_model_is_reported_not_raised(models_dir: Path, tiny_model_dir: Path) -> None:
    broken = models_dir / "broken"
    broken.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_model_dir / name).read_bytes())
    (broken / "model.onnx").write_bytes(b"not a model")
    engine = InferenceEngine(models_dir, {"summarize": "tiny", "broken": "broken"}, execution_provider="cpu")
    await engine.start()
    status = {s.operation: s for s in engine.status()}
    assert status["summarize"].loaded
    assert not status["broken"].loaded
    assert status["broken"].error is not None and status["broken"].error.startswith("failed to load: ")
    await engine.close()


async def test_folder_that_differs_from_its_manifest_is_not_loaded(models_dir: Path, tiny_model_dir: Path) -> None:
    assert (tiny_model_dir / "manifest.json").is_file()
    copy = models_dir / "edited"
    copy.mkdir()
    for path in tiny_model_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    config = copy / "generation_config.json"
    config.write_bytes(config.read_bytes().replace(b"{", b"{ ", 1))  # same meaning, different bytes
    engine = InferenceEngine(models_dir, {"summarize": "tiny", "edited": "edited"}, execution_provider="cpu")
    await engine.start()
    status = {s.operation: s for s in engine.status()}
    assert status["summarize"].loaded and status["summarize"].queue_depth == 0
    assert not status["edited"].loaded
    assert status["edited"].error is not None and "generation_config.json" in status["edited"].error
    assert "manifest.json" in status["edited"].error
    await engine.close()
