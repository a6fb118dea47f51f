"""llama.cpp's OpenAI-compatible server on the demo model, directly (issue 14, item 3).

These prove the fixture and record what this third-party engine offers, independent of the platform:
what the platform's remote engines can rely on (and where they must fall back) is asserted here, so an
upgrade of llama-cpp-python that changes it fails here first. Tiny ``max_tokens`` keep them fast.

Its greedy answers are not reproducible across requests: a prompt evaluated in one batch and the same prompt
found in its prompt cache (only the last token evaluated again) give slightly different logits, so the
same request at temperature 0 can answer differently the first time and later (measured: the seed's Arabic
translation). No test here compares two of its answers' texts.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import httpx
import openai
import pytest

from ai_platform.operations import Message
from remote_engines import RunningEngine

pytestmark = pytest.mark.slow
SENTIMENT = [
    {"role": "system", "content": "Classify the sentiment of the user's review. Answer with one word: positive or negative."},
    {"role": "user", "content": "Review: I loved this film, the acting was wonderful and I would watch it again."},
]  # fmt: skip
# Long answers (no end of turn within a few tokens), for tests that read a given number of tokens.
STORY = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def client(engine: RunningEngine) -> openai.OpenAI:
    return openai.OpenAI(base_url=engine.base_url, api_key=engine.api_key, max_retries=0, timeout=60)


def test_models_lists_the_alias_and_the_key_is_required(llama_server: RunningEngine) -> None:
    assert [m.id for m in client(llama_server).models.list().data] == [llama_server.model]
    wrong = httpx.get(f"{llama_server.base_url}/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert wrong.status_code == 401


def test_completion_has_text_and_usage(llama_server: RunningEngine) -> None:
    answer = client(llama_server).chat.completions.create(
        model=llama_server.model, messages=QUESTION, max_tokens=8, temperature=0
    )
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("length", "stop")
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 8
    assert answer.usage.prompt_tokens > 10  # the chat template's system prompt and turns


@pytest.mark.demo_model
def test_the_prompt_is_the_platforms_prompt(llama_server: RunningEngine, demo_model_dir: Path) -> None:
    """No ``--chat_format``: the GGUF's own template (ChatML with SmolLM's default system prompt), the one the
    demo export kept, so llama.cpp sees the prompt the platform's local model sees (31 tokens for "Hi")."""
    from ai_platform.runtime.model import LanguageModel

    local = LanguageModel.load(demo_model_dir, execution_provider="cpu", intra_op_threads=1)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, who are you?"}]
    for asked in (messages, messages[1:]):  # with a system message, and with the template's default one
        answer = client(llama_server).chat.completions.create(
            model=llama_server.model, messages=asked, max_tokens=1, temperature=0
        )
        prompt = local.encode_prompt([Message(role=m["role"], content=m["content"]) for m in asked])
        assert answer.usage is not None and answer.usage.prompt_tokens == len(prompt)


def test_stream_has_deltas_but_no_usage(llama_server: RunningEngine) -> None:
    """llama-cpp-python 0.3.36 accepts ``stream_options`` but ignores it: no usage chunk in a stream. The
    platform then counts a remote stream's output tokens as its content chunks: one token each here."""
    oai = client(llama_server)
    ask = {"model": llama_server.model, "messages": STORY, "max_tokens": 8, "temperature": 0}
    chunks = list(oai.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks), "llama-cpp-python now sends usage in streams: update the docs"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[-1].choices[0].finish_reason == "length" and "".join(content).strip()
    whole = oai.chat.completions.create(**ask)
    assert whole.usage is not None and whole.choices[0].finish_reason == "length"
    assert len(content) == whole.usage.completion_tokens == 8


def test_top_logprobs_of_the_first_token_score_the_options(llama_server: RunningEngine) -> None:
    """``logprobs: true, top_logprobs: 20, max_tokens: 1``: the first answer token's 20 most likely
    candidates, with their texts, enough to score labels by their first token."""
    answer = client(llama_server).chat.completions.create(
        model=llama_server.model, messages=SENTIMENT, max_tokens=1, temperature=0, logprobs=True, top_logprobs=20
    )
    assert answer.choices[0].logprobs is not None and answer.choices[0].logprobs.content is not None
    [first] = answer.choices[0].logprobs.content
    candidates = first.top_logprobs
    assert len(candidates) == 20
    assert all(c.logprob <= 0 for c in candidates)
    assert [c.logprob for c in candidates] == sorted((c.logprob for c in candidates), reverse=True)
    assert first.token == answer.choices[0].message.content == candidates[0].token  # greedy takes the top one
    assert 0.5 < sum(math.exp(c.logprob) for c in candidates) <= 1.0 + 1e-4
    # Both labels' first tokens are among them (as "positive"/"Positive", with or without a space).
    scores = {
        label: max((c.logprob for c in candidates if c.token.strip().lower() == label), default=-math.inf)
        for label in ("positive", "negative")
    }
    assert all(math.isfinite(score) for score in scores.values()), [c.token for c in candidates]
    assert scores["positive"] > scores["negative"]


def test_closing_a_stream_early_stops_its_generation(llama_server: RunningEngine) -> None:
    """The server notices the closed connection and stops generating: the next request (which waits for the
    model, one request at a time) is answered at once, correctly, and the server keeps working."""
    oai = client(llama_server)
    ask = {"model": llama_server.model, "messages": STORY, "temperature": 0, "max_tokens": 4}
    expected = oai.chat.completions.create(**ask).choices[0].message.content
    with httpx.stream(
        "POST", f"{llama_server.base_url}/chat/completions", headers=llama_server.headers,
        json={**ask, "max_tokens": 2000, "stream": True}, timeout=60,
    ) as response:  # fmt: skip
        assert response.status_code == 200
        assert next(line for line in response.iter_lines() if line.startswith("data: "))  # generation started
    started = time.monotonic()  # closed after the first chunk: 2000 tokens would take 20 s at 100 tokens/s
    again = oai.chat.completions.create(**ask)
    waited = time.monotonic() - started
    assert again.choices[0].message.content == expected
    assert waited < 10, f"the abandoned generation went on ({waited:.1f} s)"
    llama_server.assert_alive()


def test_a_prompt_over_the_context_is_a_400_context_length_exceeded(llama_server: RunningEngine) -> None:
    """OpenAI's wording and code; its "requested" count is the prompt plus ``max_tokens`` (n_ctx is 2048)."""
    long = [{"role": "user", "content": "word " * 2100}]
    r = httpx.post(
        f"{llama_server.base_url}/chat/completions", headers=llama_server.headers, timeout=60,
        json={"model": llama_server.model, "messages": long, "max_tokens": 5},
    )  # fmt: skip
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["message"].startswith("This model's maximum context length is 2048 tokens. However, you requested ")
    llama_server.assert_alive()
