"""Operations' token limits, checked before admission (issue 11, item 4).

Characters do not bound a request's work: 2,000 emoji are ~6,000 tokens (a classify of them
held the demo model for 45 s) and 8,000 x "的" ~8,050 (85 s, an empty summary, counted).
``Limits.max_input_tokens`` caps the prompt an operation builds, counted by the engine's
tokenizer before the request takes a place in the daily limit.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from litestar.testing import AsyncTestClient

from ai_platform.app import create_app
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
from harness import ServerProcess
from support import KEY, SEED_MODELS, SUMMARIZE

LIMITS = {"classify": 3072, "summarize": 4096, "translate": 2048}


@pytest.mark.anyio
async def test_limits_list_token_limits_and_a_prompt_over_one_is_refused_before_admission(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake engine counts one "token" per character of the prompt's messages.
    engine = FakeEngine(models=dict(SEED_MODELS))
    async with AsyncTestClient(create_app(Settings.from_mapping(env), engine=engine)) as client:
        limits = {e["operation"]: e for e in (await client.get("/limits", headers=KEY)).json()["limits"]}
        assert {name: limits[name]["max_input_tokens"] for name in LIMITS} == LIMITS
        operations = {e["name"]: e for e in (await client.get("/operations", headers=KEY)).json()["operations"]}
        assert {name: operations[name]["max_input_tokens"] for name in LIMITS} == LIMITS

        dense = {**SUMMARIZE, "text": "x" * 5000}  # within max_input_chars (8000), over 4096 "tokens"
        r = await client.post("/operations/summarize", json=dense, headers=KEY)
        assert r.status_code == 422, r.text
        [error] = r.json()["detail"]
        assert (error["type"], error["loc"], error["input"]) == ("string_too_long", ["body", "text"], None)
        assert error["msg"].startswith("Input is too long for operation 'summarize': its prompt is ")
        assert error["msg"].endswith("tokens; at most 4096.")
        assert engine.calls == []  # no model work
        usage = (await client.get("/limits/usage", headers=KEY)).json()["usage"]
        assert {u["operation"]: u["request_count"] for u in usage}["summarize"] == 0

        r = await client.post("/operations/summarize", json={**SUMMARIZE, "text": "x" * 3000}, headers=KEY)
        assert r.status_code == 200  # under both limits


@pytest.mark.slow
@pytest.mark.demo_model
def test_dense_inputs_are_refused_quickly_and_not_counted_on_the_demo_model(
    serve_cli: object, tmp_path: Path, demo_model_dir: Path
) -> None:
    server: ServerProcess = serve_cli(f"sqlite://{tmp_path / 'usage.sqlite3'}", demo_model_dir, workers=1)  # type: ignore[operator]
    requests = {
        "classify": {"text": "😀" * 2000, "categories": ["happy", "sad"]},
        "summarize": {"text": "的" * 8000, "max_sentences": 2},
        "translate": {"text": "的" * 4000, "source_language": "zh", "target_language": "en"},
    }
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for operation, body in requests.items():
            started = time.monotonic()
            r = client.post(f"/operations/{operation}", json=body, headers=KEY)
            assert r.status_code == 422, (operation, r.text)
            assert time.monotonic() - started < 5, f"{operation} was not refused before model work"
            [error] = r.json()["detail"]
            assert f"at most {LIMITS[operation]}." in error["msg"]
        usage = client.get("/limits/usage", headers=KEY).json()["usage"]
        assert all(u["request_count"] == 0 for u in usage), usage
        # Ordinary text of the same operations still runs.
        r = client.post(
            "/operations/classify", json={"text": "I love it!", "categories": ["happy", "sad"]}, headers=KEY
        )
        assert r.status_code == 200, r.text
