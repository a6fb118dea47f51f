"""Models in supervised child processes: the same answers, and a native crash is survived (issue 10)."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import psutil
import pytest

from ai_platform.engine_contract import PromptTooLongError
from ai_platform.errors import ModelUnavailableError, OverloadedError
from ai_platform.operations import Message
from ai_platform.runtime.model import LanguageModel
from ai_platform.runtime.model_process import ModelProcess, _decode_error, _encode_error, describe_exit
from ai_platform.runtime.served_model import ModelOptions
from runtime_reference import greedy_generate

pytestmark = pytest.mark.anyio

OPTIONS = ModelOptions(execution_provider="cpu", intra_op_threads=1, max_queue=64, max_batch=8)
LONG = 1500  # new tokens: long enough that the tiny model is still decoding when it is killed


def messages(topic: str) -> list[Message]:
    return [Message("user", f"Summarize: {topic}.")]


def reference(model: LanguageModel, topic: str, limit: int) -> str:
    prompt = model.encode_prompt(messages(topic))
    generated = greedy_generate(
        model.decoder, prompt, max_new_tokens=model.budget(prompt, limit), eos_ids=model.eos_ids
    )
    return model.completion(generated).text


@pytest.fixture
async def process(tiny_model_dir: Path) -> AsyncIterator[ModelProcess]:
    served = ModelProcess("tiny", tiny_model_dir, OPTIONS)
    await served.start()
    assert served.loaded, served.error
    yield served
    await served.close()


async def wait_for(condition: object, seconds: float = 30) -> None:
    with anyio.fail_after(seconds):
        while not condition():  # type: ignore[operator]
            await anyio.sleep(0.02)


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def working_in_child(process: ModelProcess, calls: int) -> None:
    """Wait until the child's scheduler holds ``calls`` calls and has spent 50 ms of CPU on them (decoding)."""
    with anyio.fail_after(30):
        while await process.child_queue_depth() != calls:
            await anyio.sleep(0.02)
    assert process.pid is not None
    child = psutil.Process(process.pid)
    started = cpu_seconds(child)
    await wait_for(lambda: cpu_seconds(child) - started >= 0.05)


async def test_answers_equal_the_in_process_model(process: ModelProcess, tiny_model: LanguageModel) -> None:
    assert process.provider == "CPUExecutionProvider" and process.pid not in (None, os.getpid())
    completion = await process.generate(messages("the fox"), 20)
    assert completion.text == reference(tiny_model, "the fox", 20)
    options = ["billing", "technical support", "sales"]
    prompt, answers = tiny_model.encode_choice(messages("the fox"), options)
    choice = await process.choose(messages("the fox"), options)
    expected = tiny_model.choose(prompt, answers, options, lambda: False)
    assert choice.best == expected.best and choice.output_tokens == expected.output_tokens
    assert choice.scores == pytest.approx(
        expected.scores, rel=1e-4, abs=1e-9
    )  # prefix-cache reuse shifts the last bits
    assert process.queue_depth == 0


async def test_client_errors_cross_the_process_boundary_as_themselves(process: ModelProcess) -> None:
    with pytest.raises(PromptTooLongError) as raised:
        await process.generate(messages("word " * 3000), 10)
    assert raised.value.tokens > raised.value.most and "context window" in str(raised.value)
    assert raised.value.errors[0]["type"] == "string_too_long"  # still the 422 it renders to
    assert process.loaded  # a client's error is not a crash
    overloaded = _decode_error(_encode_error(OverloadedError("busy", retry_after=3)))
    assert isinstance(overloaded, OverloadedError) and (overloaded.detail, overloaded.retry_after) == ("busy", 3)
    too_long = _decode_error(_encode_error(PromptTooLongError(9, 4, operation="op", loc=["body", "text"])))
    assert isinstance(too_long, PromptTooLongError)
    assert (too_long.tokens, too_long.most, too_long.operation, too_long.loc) == (9, 4, "op", ["body", "text"])


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL, signal.SIGABRT], ids=lambda s: s.name)
async def test_a_killed_model_process_fails_its_calls_503_and_comes_back(
    process: ModelProcess, tiny_model: LanguageModel, sig: signal.Signals
) -> None:
    outcomes: list[BaseException | str] = []

    async def call(topic: str) -> None:
        try:
            outcomes.append((await process.generate(messages(topic), LONG)).text)
        except ModelUnavailableError as exc:
            outcomes.append(exc)

    victim = process.pid
    assert victim is not None
    async with anyio.create_task_group() as tg:
        for index in range(4):
            tg.start_soon(call, f"topic {index}")
        await wait_for(lambda: process.queue_depth == 4)
        await working_in_child(process, 4)
        os.kill(victim, sig)
    assert len(outcomes) == 4 and all(isinstance(o, ModelUnavailableError) for o in outcomes), outcomes
    error = outcomes[0]
    assert isinstance(error, ModelUnavailableError)
    assert error.status_code == 503 and int(error.headers["Retry-After"]) >= 1
    assert error.detail == "Model 'tiny' stopped unexpectedly and is restarting; retry shortly."
    assert not process.loaded and process.queue_depth == 0
    assert process.error is not None and f"killed by {sig.name}" in process.error
    with pytest.raises(ModelUnavailableError, match="is not available; retry later"):
        await process.generate(messages("meanwhile"), 5)

    await wait_for(lambda: process.loaded)  # restarted by itself after the back-off
    assert process.restarts == 1 and process.pid not in (None, victim)
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    completion = await process.generate(messages("after"), 16)
    assert completion.text == reference(tiny_model, "after", 16)


async def test_a_cancelled_call_stops_in_the_child(process: ModelProcess, tiny_model: LanguageModel) -> None:
    with anyio.CancelScope() as scope:

        async def cancel_once_decoding() -> None:
            await wait_for(lambda: process.queue_depth == 1)
            await working_in_child(process, 1)
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_once_decoding)
            await process.generate(messages("cancel me"), LONG)
            pytest.fail("the call ended before it was cancelled")
    assert process.queue_depth == 0  # this side forgets the call at once
    # The child stops the call and says so; its scheduler then holds nothing, so its loop takes no more steps.
    await wait_for(lambda: process.cancels_acknowledged == 1, seconds=5)
    child = psutil.Process(process.pid)
    acknowledged = cpu_seconds(child)
    with anyio.fail_after(5):
        while await process.child_queue_depth() != 0:
            await anyio.sleep(0.02)
    for _ in range(5):
        await anyio.sleep(0.05)
        assert await process.child_queue_depth() == 0
    # And it does no more work: a child that kept decoding the cancelled sequence to its LONG limit burns
    # about a CPU second here (measured: 0.8 s with the cancel ignored, 0.0 s as it is).
    assert cpu_seconds(child) - acknowledged < 0.25
    # The batch it left still works: a short call right after gets the reference answer.
    with anyio.fail_after(5):
        completion = await process.generate(messages("next"), 8)
    assert completion.text == reference(tiny_model, "next", 8)
    # The child drops the sequence at its next step: a short call right after is not stuck behind it.
    with anyio.fail_after(5):
        completion = await process.generate(messages("next"), 8)
    assert completion.text == reference(tiny_model, "next", 8)


async def test_close_stops_the_child_and_fails_calls(tiny_model_dir: Path) -> None:
    served = ModelProcess("tiny", tiny_model_dir, OPTIONS)
    await served.start()
    pid = served.pid
    assert pid is not None
    outcome: list[BaseException] = []

    async def call() -> None:
        try:
            await served.generate(messages("closing"), LONG)
        except ModelUnavailableError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await wait_for(lambda: served.queue_depth == 1)
        await served.close()
    assert [str(e) for e in outcome] == ["Model 'tiny' is shutting down."]
    assert not served.loaded and served.error == "engine closed" and served.pid is None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_a_folder_that_fails_to_load_reports_why(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    served = ModelProcess("broken", tmp_path, OPTIONS)
    await served.start()
    assert not served.loaded and served.pid is None
    assert served.error is not None and served.error.startswith("failed to load: ")
    await served.close()


def test_exit_descriptions() -> None:
    assert describe_exit(-11) == "killed by SIGSEGV"
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(None) == "stopped responding"
