"""A second AI Platform as an OpenAI-compatible engine (issue 14, item 3): the fixture, and what it offers.

The front platform's remote operations reach it exactly as they reach a third-party server: over
``/v1/chat/completions`` with a client key. It answers ``logprobs``/``top_logprobs``, so ``classify`` against
it may use ``choose=logprobs`` (test_remote_operations.py) as well as ``choose=generate``.
"""

from __future__ import annotations

import math

import openai
import pytest

from remote_engines import RunningEngine

pytestmark = [pytest.mark.slow, pytest.mark.demo_model]
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def client(engine: RunningEngine) -> openai.OpenAI:
    return openai.OpenAI(base_url=engine.base_url, api_key=engine.api_key, max_retries=0, timeout=60)


def test_completion_stream_and_usage(platform_engine: RunningEngine) -> None:
    oai = client(platform_engine)
    assert [m.id for m in oai.models.list().data] == [platform_engine.model] == ["smollm2-135m-instruct"]
    ask = {"model": platform_engine.model, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    answer = oai.chat.completions.create(**ask)
    text = answer.choices[0].message.content
    assert text and "Paris" in text
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 12
    chunks = list(oai.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text  # greedy: the same
    # The last chunk carries the usage (no choices), as OpenAI sends it.
    assert not chunks[-1].choices and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    platform_engine.assert_alive()


def test_first_token_top_logprobs(platform_engine: RunningEngine) -> None:
    """What ``choose=logprobs`` asks (deploy/README.md's check): the first answer token's 20 most likely tokens."""
    oai = client(platform_engine)
    answer = oai.chat.completions.create(
        model=platform_engine.model, messages=MESSAGES, max_tokens=1, logprobs=True, top_logprobs=20, temperature=0
    )
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None and len(logprobs.content) == 1
    first = logprobs.content[0]
    assert len(first.top_logprobs) == 20 and first.top_logprobs[0].token == first.token  # greedy: the likeliest
    assert first.token == answer.choices[0].message.content or first.token.strip() == answer.choices[0].message.content
    assert sum(math.exp(t.logprob) for t in first.top_logprobs) <= 1 + 1e-6


def test_a_wrong_key_is_refused(platform_engine: RunningEngine) -> None:
    oai = openai.OpenAI(base_url=platform_engine.base_url, api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        oai.models.list()
