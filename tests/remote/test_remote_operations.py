"""Operations served by remote OpenAI-compatible engines pass the local model's contract checks (issue 14, item 3).

A front AI Platform whose ``OPERATION_MODEL_MAP`` points summarize, translate and classify at
(a) llama.cpp's server (llama-cpp-python, a server no one here wrote) and (b) a second AI Platform, both
on the demo model, answers exactly what ``test_end_to_end.check_all_operations`` requires of a local model.
Against the second platform (the same ONNX model, greedy) the generated answers are also exactly the local
reference's; llama.cpp runs the Q4_1 GGUF, so only the contract is checked there.

Classify: ``choose=logprobs`` (the default) scores the labels from the first answer token's top 20
logprobs, which llama.cpp and the platform's ``/v1`` offer; ``choose=generate`` from a greedy answer.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

import support
from ai_platform.app import create_app
from ai_platform.settings import Settings
from ai_platform.testing import platform_env
from remote_engines import RunningEngine
from support import ADMIN, CLASSIFY, KEY, TRANSLATE
from test_end_to_end import REQUESTS, assert_served_as_expected, check_all_operations, demo_reference
from test_streaming import events

pytestmark = [
    pytest.mark.slow,
    pytest.mark.anyio,
    pytest.mark.skipif(
        importlib.util.find_spec("ai_platform.remote") is None, reason="remote engines not implemented yet"
    ),
]
__all__ = ["demo_reference"]  # a fixture of test_end_to_end's, used here too
KEY_ENV = "AI_PLATFORM_TEST_ENGINE_KEY"  # the front reads the engine's key from this variable (?key_env=)
Front = Callable[..., AbstractAsyncContextManager[AsyncTestClient]]  # type: ignore[type-arg]


def target(engine: RunningEngine, **options: str) -> str:
    """The map value naming ``engine``'s model: ``openai+http://127.0.0.1:PORT/v1?key_env=...#MODEL``."""
    query = "&".join(f"{name}={value}" for name, value in {"key_env": KEY_ENV, **options}.items())
    return f"openai+{engine.base_url}?{query}#{engine.model}"


@pytest.fixture
def front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Front:
    """A front platform (in this process) whose three operations run on ``engine``; classify with ``choose``.

    Its ``meta.model_used`` is the engine's model id: the contract checks expect that instead of the seed's
    folder names.
    """

    @asynccontextmanager
    async def make(engine: RunningEngine, choose: str) -> AsyncIterator[AsyncTestClient]:  # type: ignore[type-arg]
        monkeypatch.setenv(KEY_ENV, engine.api_key)
        monkeypatch.setattr(support, "SEED_MODELS", dict.fromkeys(REQUESTS, engine.model))
        models = {operation: target(engine) for operation in REQUESTS}
        models["classify"] = target(engine, choose=choose)
        env = platform_env(tmp_path, ENABLED_PLUGINS=",".join(REQUESTS), OPERATION_MODEL_MAP=json.dumps(models))
        del env["DEFAULT_MODEL"]
        async with AsyncTestClient(create_app(Settings.from_mapping(env))) as client:
            # The front probes its engines in the background: healthy once it has seen them answer.
            deadline = time.monotonic() + 30
            while (health := (await client.get("/health", headers=ADMIN)).json())["status"] != "healthy":
                assert time.monotonic() < deadline, health
                await asyncio.sleep(0.1)
            yield client

    return make


@pytest.mark.parametrize("choose", ["logprobs", "generate"])
async def test_llama_server_serves_every_operation(front: Front, llama_server: RunningEngine, choose: str) -> None:
    async with front(llama_server, choose) as client:
        bodies = await check_all_operations(client)
    assert bodies["summarize"]["summary"] and bodies["translate"]["translated_text"]
    llama_server.assert_alive()


async def test_llama_server_streams_a_translation(front: Front, llama_server: RunningEngine) -> None:
    """Deltas, then the body; llama.cpp sends no usage in streams, so ``output_tokens`` is its chunk count.

    Not compared with a second, non-streamed call: llama.cpp's greedy answers depend on its prompt cache
    (test_llama_server.py's docstring)."""
    async with front(llama_server, "logprobs") as client:
        response, received = await events(client, "/operations/translate", TRANSLATE)
        assert response.status_code == 200
        *deltas, (last, body) = received
        assert last == "result" and deltas and {name for name, _ in deltas} == {"delta"}
        assert "".join(data["text"] for _, data in deltas) == body["translated_text"]
        assert 0 < body["meta"]["output_tokens"] <= 512
        usage = (await client.get("/limits/usage", headers=KEY)).json()["usage"]
        translate = next(u for u in usage if u["operation"] == "translate")
        assert (translate["request_count"], translate["total_tokens"]) == (1, body["meta"]["output_tokens"])


@pytest.mark.demo_model
async def test_second_platform_serves_every_operation_as_the_local_model(
    front: Front, platform_engine: RunningEngine, demo_reference: Any
) -> None:
    async with front(platform_engine, "generate") as client:
        bodies = await check_all_operations(client)
    for operation in ("summarize", "translate"):  # the same model, greedy: the local answers exactly
        assert_served_as_expected(demo_reference, operation, REQUESTS[operation], bodies[operation])
    platform_engine.assert_alive()


@pytest.mark.demo_model
async def test_classify_by_logprobs_on_the_second_platform(front: Front, platform_engine: RunningEngine) -> None:
    """``choose=logprobs`` against another AI Platform: its ``/v1`` answers ``top_logprobs: 20``, the front scores
    the labels from them (no 502 "no logprobs in the answer"), as it does with llama.cpp's server."""
    async with front(platform_engine, "logprobs") as client:
        r = await client.post("/operations/classify", json=CLASSIFY, headers=KEY)
        assert r.status_code == 200, r.text
        classified = r.json()
        assert classified["label"] in CLASSIFY["categories"]  # the 135M model's first token says little (24% on eval)
        assert list(classified["scores"]) == CLASSIFY["categories"]
        assert sum(classified["scores"].values()) == pytest.approx(1.0)
        # One token asked (max_tokens 1), scored by the candidates' probabilities: no option is at the 10^-4
        # that choose=generate gives every option its answer does not name.
        assert classified["meta"]["output_tokens"] == 1 and min(classified["scores"].values()) > 1e-3
        usage = (await client.get("/limits/usage", headers=KEY)).json()["usage"]
        assert {u["operation"]: u["request_count"] for u in usage}["classify"] == 1
    platform_engine.assert_alive()
