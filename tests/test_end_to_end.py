"""End to end on real ONNX models: the tiny random Qwen2 (fast) and the SmolLM2 demo model (slower).

Tiny-model text is meaningless, so these tests check structure and invariants; the
demo-model tests check that what is served is exactly what one unbatched greedy decode of
the same prompt gives in this process (greedy decoding is deterministic), alone, after the
model went idle, and batched with other requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from ai_platform.app import create_app
from ai_platform.operations import Choice, Completion, Generate, ResponseMeta
from ai_platform.plugins import load_plugins
from ai_platform.settings import Settings
from support import ADMIN, CLASSIFY, KEY, SEED_MODELS, SUMMARIZE, TRANSLATE, assert_meta, free_port
from test_disconnect import live_server, queue_depth

REQUESTS = {"summarize": SUMMARIZE, "translate": TRANSLATE, "classify": CLASSIFY}


def seed_layout(models_dir: Path, model: Path) -> None:
    """The seed's folders, all symlinked to one model (as its guide suggests)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    for folder in SEED_MODELS.values():
        (models_dir / folder).symlink_to(model, target_is_directory=True)


async def check_all_operations(client: AsyncTestClient) -> dict[str, dict[str, object]]:  # type: ignore[type-arg]
    bodies = {}
    for operation, request in REQUESTS.items():
        r = await client.post(f"/operations/{operation}", json=request, headers=KEY)
        assert r.status_code == 200, r.text
        body = r.json()
        assert_meta(body["meta"], operation, request)
        bodies[operation] = body
    summary = bodies["summarize"]
    assert summary["sentence_count"] <= SUMMARIZE["max_sentences"]
    assert summary["meta"]["output_tokens"] <= 512
    assert bodies["translate"]["meta"]["output_tokens"] <= 512
    classified = bodies["classify"]
    assert classified["label"] in CLASSIFY["categories"]
    assert list(classified["scores"]) == CLASSIFY["categories"]
    assert classified["confidence"] == classified["scores"][classified["label"]] == max(classified["scores"].values())
    assert sum(classified["scores"].values()) == pytest.approx(1.0)
    return bodies


@pytest.fixture
def tiny_env(env: dict[str, str], tiny_model_dir: Path) -> dict[str, str]:
    seed_layout(Path(env["MODELS_DIR"]), tiny_model_dir)
    return env


@pytest.fixture
async def tiny_client(tiny_env: dict[str, str]) -> AsyncIterator[AsyncTestClient]:  # type: ignore[type-arg]
    async with AsyncTestClient(create_app(Settings.from_mapping(tiny_env))) as client:
        yield client


@pytest.mark.anyio
async def test_tiny_model_serves_every_operation(tiny_client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    await check_all_operations(tiny_client)
    usage = (await tiny_client.get("/limits/usage", headers=KEY)).json()["usage"]
    assert {u["operation"]: u["request_count"] for u in usage} == {"summarize": 1, "translate": 1, "classify": 1}


@pytest.mark.anyio
async def test_tiny_model_reuses_the_prompt_start_of_earlier_requests(tiny_client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    def reused(metrics: str) -> float:
        lines = [line for line in metrics.splitlines() if line.startswith("ai_platform_prompt_tokens_reused_total")]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if 'operation="summarize"' in line)

    first = await tiny_client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)
    before = reused((await tiny_client.get("/metrics", headers=ADMIN)).text)
    other = {**SUMMARIZE, "text": "A different text entirely, about the weather in spring."}
    second = await tiny_client.post("/operations/summarize", json=other, headers=KEY)
    assert first.status_code == second.status_code == 200
    # The system prompt and the instruction come first in both: their positions are not computed again.
    assert reused((await tiny_client.get("/metrics", headers=ADMIN)).text) >= before + 20


@pytest.mark.anyio
async def test_tiny_model_health_reports_models_and_provider(
    tiny_client: AsyncTestClient, tiny_env: dict[str, str]
) -> None:  # type: ignore[type-arg]
    health = (await tiny_client.get("/health", headers=ADMIN)).json()
    assert health["status"] == "healthy"
    assert sorted((m["name"], m["loaded"], m["provider"], m["path"]) for m in health["models"]) == sorted(
        (f"{op} ({folder})", True, "CPUExecutionProvider", str(Path(tiny_env["MODELS_DIR"]) / folder))
        for op, folder in SEED_MODELS.items()
    )


@pytest.mark.anyio
async def test_missing_model_folder_is_503_and_others_keep_working(env: dict[str, str], tiny_model_dir: Path) -> None:
    models = Path(env["MODELS_DIR"])
    models.mkdir()
    (models / "qwen-summarize").symlink_to(tiny_model_dir)
    async with AsyncTestClient(create_app(Settings.from_mapping(env))) as client:
        r = await client.post("/operations/translate", json=TRANSLATE, headers=KEY)
        assert r.status_code == 503 and "qwen-translate" in r.json()["detail"]
        assert "Retry-After" in r.headers
        assert (await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)).status_code == 200
        health = (await client.get("/health", headers=ADMIN)).json()
        assert health["status"] == "degraded"
        loaded = {m["name"]: (m["loaded"], m["error"]) for m in health["models"]}
        assert loaded["summarize (qwen-summarize)"] == (True, None)
        assert loaded["translate (qwen-translate)"] == (False, "model folder not found")


def call(port: int, method: str, path: str, body: object = None) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **KEY},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_cli_serves_over_http_without_torch(tiny_env: dict[str, str], tmp_path: Path) -> None:
    """`ai-platform serve` in its own process: real sockets, real uvicorn, and no torch imported."""
    port = free_port()
    probe = tmp_path / "sitecustomize.py"
    # Fails the server at import time if anything on the serving path imports torch.
    probe.write_text("import sys\nclass _NoTorch:\n    def find_spec(self, name, *a):\n"
                     "        if name == 'torch' or name.startswith('torch.'):\n"
                     "            raise ImportError('torch imported while serving')\n"
                     "sys.meta_path.insert(0, _NoTorch())\n")  # fmt: skip
    env = {**os.environ, **tiny_env, "PYTHONPATH": str(tmp_path)}
    cli = Path(sys.executable).parent / "ai-platform"
    server = subprocess.Popen([str(cli), "serve", "--port", str(port)], env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, health = call(port, "GET", "/health")
                break
            except OSError:
                assert server.poll() is None, "server exited"
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        assert status == 200 and health["status"] == "healthy"
        for operation, request in REQUESTS.items():
            status, body = call(port, "POST", f"/operations/{operation}", request)
            assert status == 200, body
            assert_meta(body["meta"], operation, request)  # type: ignore[arg-type]
        status, body = call(port, "POST", "/operations/summarize", {"text": ""})
        assert status == 422 and body["error"] == "Request validation failed."
    finally:
        server.terminate()
        assert server.wait(timeout=30) in (0, -15)  # uvicorn re-raises SIGTERM after a clean shutdown


@pytest.fixture(scope="module")
def demo_reference(demo_model_dir: Path) -> Any:
    """The demo model loaded in this process, to compute what the server must answer."""
    from ai_platform.runtime.model import LanguageModel

    return LanguageModel.load(demo_model_dir, execution_provider="cpu", intra_op_threads=None)


def expected_body(model: Any, operation: str, request: dict[str, object]) -> tuple[dict[str, Any], Completion | Choice]:
    """The response (without ``meta``) the operation gives for one unbatched greedy decode, computed here."""
    from runtime_reference import greedy_generate

    plugins = load_plugins(enabled=list(REQUESTS))
    spec = plugins.operations[operation]
    parsed = msgspec.convert(request, spec.request_type)
    call = plugins.build_model_call(spec, parsed)
    result: Completion | Choice
    if isinstance(call, Generate):
        limit = min(call.max_output_tokens or spec.limits.max_output_tokens, spec.limits.max_output_tokens)
        prompt = model.encode_prompt(call.messages)
        budget = model.budget(prompt, limit)
        result = model.completion(greedy_generate(model.decoder, prompt, max_new_tokens=budget, eos_ids=model.eos_ids))
    else:
        options = list(dict.fromkeys(call.options))
        prompt, answers = model.encode_choice(call.messages, options)
        baseline = model.encode_choice(call.neutral, options) if call.neutral else None
        result = model.choose(prompt, answers, options, lambda: False, baseline)
    meta = ResponseMeta(
        operation=operation, model_used="-", input_chars=0, output_tokens=result.output_tokens,
        execution_time_ms=0.0, request_id=None, timestamp="-",
    )  # fmt: skip
    body = msgspec.to_builtins(plugins.build_response(spec, parsed, result, meta))
    del body["meta"]
    return body, result


def assert_served_as_expected(model: Any, operation: str, request: dict[str, object], served: dict[str, Any]) -> None:
    expected, result = expected_body(model, operation, request)
    served = dict(served)
    meta = served.pop("meta")
    assert meta["output_tokens"] == result.output_tokens, (operation, request)
    if isinstance(result, Choice):  # probabilities: equal up to float rounding
        assert served["label"] == expected["label"]
        assert served["scores"] == pytest.approx(expected["scores"], rel=1e-4, abs=1e-6)
        assert served["confidence"] == pytest.approx(expected["confidence"], rel=1e-4)
    else:
        assert served == expected, (operation, request)


@pytest.mark.demo_model
@pytest.mark.anyio
async def test_demo_model_serves_every_operation(
    env: dict[str, str], demo_model_dir: Path, demo_reference: Any
) -> None:
    seed_layout(Path(env["MODELS_DIR"]), demo_model_dir)
    async with AsyncTestClient(create_app(Settings.from_mapping(env))) as client:
        bodies = await check_all_operations(client)
    summary = str(bodies["summarize"]["summary"])
    assert summary and summary.count(" ") >= 3, summary  # real words, not an empty or one-token answer
    for operation, request in REQUESTS.items():
        assert_served_as_expected(demo_reference, operation, request, bodies[operation])


def _translate(text: str, source: str, target: str) -> dict[str, object]:
    return {"text": text, "source_language": source, "target_language": target}


# Distinct texts, each with a short answer from the demo model (a repeated prompt would meet its own
# KV in the prefix cache: see tests/runtime/test_demo_model.py).
ALONE = ("translate", _translate("The weather in spring is mild and pleasant.", "en", "fr"))
AFTER_IDLE = ("summarize", {"text": "The city council voted on Tuesday to expand the bike lane network. Construction "
              "begins in May and will take two years. Residents have mixed feelings about the loss of parking.",
              "max_sentences": 1})  # fmt: skip
BATCHED = [
    ("translate", _translate("The meeting is moved to Thursday morning.", "en", "fr")),
    ("translate", _translate("Le chat dort sur le canapé depuis ce matin.", "fr", "en")),
    (
        "summarize",
        {
            "text": "Our support team answered 1,200 tickets last month. Most were about password resets. "
            "The new self-service page should cut that number in half.",
            "max_sentences": 2,
        },
    ),
    (
        "classify",
        {
            "text": "I was charged twice for my subscription this month.",
            "categories": ["billing", "technical_support", "sales"],
        },
    ),
]
IDLE_AGAIN = ("translate", _translate("The library opens at nine every morning.", "en", "fr"))


@pytest.mark.demo_model
@pytest.mark.anyio
async def test_demo_model_answers_alone_after_idle_and_batched_exactly_as_the_reference(
    env: dict[str, str], demo_model_dir: Path, demo_reference: Any
) -> None:
    seed_layout(Path(env["MODELS_DIR"]), demo_model_dir)
    served: list[tuple[str, dict[str, object], dict[str, Any]]] = []
    depths: list[int] = []

    # A real server: Litestar's AsyncTestClient would run the "concurrent" requests one after another.
    async with live_server(create_app(Settings.from_mapping(env))) as (_, client):

        async def post(operation: str, request: dict[str, object]) -> None:
            r = await client.post(f"/operations/{operation}", json=request, headers=KEY)
            assert r.status_code == 200, r.text
            served.append((operation, request, r.json()))

        async def watch_queue() -> None:
            while True:
                depths.append(await queue_depth(client, "translate"))  # all operations share the one model

        await post(*ALONE)
        await post(*AFTER_IDLE)  # the batch was empty: it grows again from nothing
        watcher = asyncio.ensure_future(watch_queue())
        try:
            await asyncio.gather(*(post(*call) for call in BATCHED))
        finally:
            watcher.cancel()
        assert max(depths) > 1, "the requests never were in the model together"
        assert await queue_depth(client, "translate") == 0
        await post(*IDLE_AGAIN)
    assert len(served) == 2 + len(BATCHED) + 1
    for operation, request, body in served:
        assert_served_as_expected(demo_reference, operation, request, body)
