"""``logprobs``/``top_logprobs`` on ``/v1/chat/completions`` (issue 13, item 2), with the official ``openai`` client.

On the tiny model through a real server (its model in a child process): each answer token's
log-probability is the reference's (log_softmax of the same model's logits, run here without the
server), with the ``top_logprobs`` most likely tokens, sorted, the chosen one first when greedy; a
stream's chunks carry the same entries; ``top_logprobs`` without ``logprobs`` is OpenAI's 400.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from ai_platform.operations import Message
from ai_platform.runtime.generation import _log_softmax
from ai_platform.runtime.model import LanguageModel
from ai_platform.testing import platform_env
from runtime_reference import RecordingDecoder, greedy_generate
from support import KEY
from test_openai_api import HELLO, serving
from test_streaming import events

pytestmark = pytest.mark.anyio
TOKENS = 12


def reference_logprobs(model_dir: Path) -> list[tuple[str, float, list[float]]]:
    """(token text, log-probability, the 5 largest log-probabilities) of each greedy answer token."""
    model = LanguageModel.load(model_dir, execution_provider="cpu", intra_op_threads=1)
    recording = RecordingDecoder(model.decoder)
    prompt = model.encode_prompt([Message(m["role"], m["content"]) for m in HELLO])
    tokens = greedy_generate(recording, prompt, max_new_tokens=TOKENS, eos_ids=model.eos_ids).tokens  # type: ignore[arg-type]
    rows = []
    for token, logits in zip(tokens, recording.logits, strict=False):
        log_probs = _log_softmax(logits)
        rows.append((model.tokenizer.piece(token)[0], float(log_probs[token]), sorted(log_probs, reverse=True)[:5]))
    return rows


def entries(logprobs: Any) -> list[dict[str, Any]]:
    return [entry.model_dump() for entry in (logprobs.content if logprobs is not None else None) or []]


async def test_logprobs_through_the_openai_client(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = platform_env(
        tmp_path, ENABLED_PLUGINS="chat", OPENAI_API="true",
        MODELS_DIR=str(tiny_model_dir.parent), DEFAULT_MODEL=tiny_model_dir.name,
    )  # fmt: skip
    expected = reference_logprobs(tiny_model_dir)
    ask: dict[str, Any] = {"model": tiny_model_dir.name, "messages": HELLO, "max_tokens": TOKENS, "temperature": 0}
    async with serving(env) as (oai, client):
        answer = await oai.chat.completions.create(**ask, logprobs=True, top_logprobs=5)
        logprobs = answer.choices[0].logprobs
        assert logprobs is not None and logprobs.content is not None and len(logprobs.content) == TOKENS
        for entry, (token, logprob, top) in zip(logprobs.content, expected, strict=True):
            assert entry.token == token and entry.logprob == pytest.approx(logprob, abs=1e-4)
            assert entry.bytes is not None and bytes(entry.bytes).decode(errors="replace") == token
            assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top, abs=1e-4)  # sorted, 5
            assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (entry.token, entry.logprob)

        # Streamed: the chunks' entries, joined, are the same.
        stream = await oai.chat.completions.create(**ask, logprobs=True, top_logprobs=5, stream=True)
        chunks = [chunk async for chunk in stream]
        assert [e for c in chunks for choice in c.choices for e in entries(choice.logprobs)] == entries(logprobs)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.choices[0].message.content

        # logprobs alone: no alternatives; not asked: null.
        alone = await oai.chat.completions.create(**ask, logprobs=True)
        assert alone.choices[0].logprobs is not None and alone.choices[0].logprobs.content is not None
        assert [(e.token, e.top_logprobs) for e in alone.choices[0].logprobs.content] == [
            (t, []) for t, _, _ in expected
        ]
        assert (await oai.chat.completions.create(**ask)).choices[0].logprobs is None

        for wrong in (
            {"top_logprobs": 3},
            {"logprobs": False, "top_logprobs": 3},
            {"logprobs": True, "top_logprobs": 21},
        ):
            with pytest.raises(openai.BadRequestError) as refused:
                await oai.chat.completions.create(**ask, **wrong)
            assert refused.value.param == "top_logprobs", wrong

        # The platform's own route answers them too.
        body = {"messages": HELLO, "max_tokens": TOKENS, "temperature": 0, "logprobs": True, "top_logprobs": 5}
        plain = (await client.post("/operations/chat", json=body, headers=KEY)).json()
        assert plain["logprobs"] == entries(logprobs)
        # Streamed there: text deltas, then the body with them.
        response, received = await events(client, "/operations/chat", body)
        assert response.status_code == 200 and received[-1][0] == "result"
        assert "".join(data["text"] for name, data in received if name == "delta") == plain["content"]
        assert received[-1][1]["logprobs"] == plain["logprobs"]
