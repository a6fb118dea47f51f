"""How Choose turns the model into label probabilities (issue 12, item 6): the maths on known
logits, then contextual calibration end to end on the tiny model and through the engine."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from ai_platform.operations import Choose, Message
from ai_platform.runtime.engine import InferenceEngine
from ai_platform.runtime.generation import option_log_probs_steps, run_steps
from ai_platform.runtime.model import LanguageModel, option_probabilities
from ai_platform_classify import ClassifyRequest
from ai_platform_classify import prompt as classify_prompt
from runtime_reference import score_options

pytestmark = pytest.mark.anyio

# A bigram "model" over 4 tokens: the logits at a position depend only on the token fed there.
BIGRAM = np.log(
    np.array(
        [
            [0.1, 0.2, 0.3, 0.4],
            [0.25, 0.25, 0.25, 0.25],
            [0.7, 0.1, 0.1, 0.1],
            [0.5, 0.3, 0.1, 0.1],
        ]
    )
)


class BigramDecoder:
    """Stands in for OnnxDecoder: next-token probabilities are BIGRAM[the token fed]; counts passes."""

    max_positions = 64

    def __init__(self, fused_attention: bool) -> None:
        self.fused_attention = fused_attention
        self.passes = 0

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, 1, 0, 1), dtype=np.float32)]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[np.ndarray],
        keep_logits: int | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        self.passes += 1
        logits = BIGRAM[input_ids]
        grown = [np.zeros((input_ids.shape[0], 1, layer.shape[2] + input_ids.shape[1], 1)) for layer in past]
        return (logits[:, -keep_logits:] if keep_logits else logits), grown


@pytest.mark.parametrize("fused", [False, True])
def test_each_token_gets_its_log_probability_given_the_ones_before(fused: bool) -> None:
    decoder = BigramDecoder(fused)
    options = [[3], [2, 0, 1], [0, 3]]
    per_token = run_steps(option_log_probs_steps(decoder, [1, 2], options), lambda: False)  # type: ignore[arg-type]
    p = np.exp(BIGRAM)
    # The prompt ends with token 2, so every option's first token is drawn from BIGRAM[2].
    expected = [[p[2, 3]], [p[2, 2], p[2, 0], p[0, 1]], [p[2, 0], p[0, 3]]]
    assert len(per_token) == 3
    for got, want in zip(per_token, expected, strict=True):
        np.testing.assert_allclose(got, np.log(want), rtol=1e-12)
    assert score_options(decoder, [1, 2], options) == pytest.approx([sum(np.log(w)) for w in expected])  # type: ignore[arg-type]


def test_option_probabilities_are_the_softmax_of_the_scores() -> None:
    assert option_probabilities([math.log(1), math.log(3)]) == pytest.approx([0.25, 0.75])
    # Shifted by a shared constant (huge, negative): the same probabilities, no underflow.
    assert option_probabilities([-1000.0, -1000.0 + math.log(3)]) == pytest.approx([0.25, 0.75])


def test_a_neutral_baseline_is_subtracted_and_kept(tiny_model: LanguageModel) -> None:
    decoder = BigramDecoder(False)
    model = LanguageModel(tiny_model.tokenizer, decoder, [3])  # type: ignore[arg-type]
    answers = [[3, 3], [0, 3]]
    options = ["a", "b"]
    p = np.exp(BIGRAM)
    # After prompt [1]: a = p[1,3] p[3,3], b = p[1,0] p[0,3]. After neutral [2]: a = p[2,3] p[3,3], b = p[2,0] p[0,3].
    plain = run_steps(model.choose_steps([1], answers, options), lambda: False)
    assert plain.scores["a"] == pytest.approx(p[1, 3] * p[3, 3] / (p[1, 3] * p[3, 3] + p[1, 0] * p[0, 3]))
    calibrated_a = math.log(p[1, 3] / p[2, 3])  # the second token is the same under both prompts: it cancels
    calibrated_b = math.log(p[1, 0] * p[0, 3] / (p[2, 0] * p[0, 3]))
    want = option_probabilities([calibrated_a, calibrated_b])
    before = decoder.passes
    first = run_steps(model.choose_steps([1], answers, options, ([2], answers)), lambda: False)
    assert list(first.scores.values()) == pytest.approx(want)
    passes = decoder.passes - before
    second = run_steps(model.choose_steps([1], answers, options, ([2], answers)), lambda: False)
    assert second.scores == first.scores
    assert decoder.passes - before - passes == passes // 2  # the baseline's passes are not run again
    # "b" led only by what the model says whatever the text; calibrated, the text's preference decides.
    assert plain.best == "b" and first.best == "a"


def test_classify_calibrates_against_the_same_prompt_without_the_text(tiny_model: LanguageModel) -> None:
    request = ClassifyRequest(text="The router is broken again.", categories=["billing", "technical support", "sales"])
    call = classify_prompt(request)
    assert call.neutral and call.neutral != call.messages
    assert "The router" not in call.neutral[-1].content and "N/A" in call.neutral[-1].content
    prompt, answers = tiny_model.encode_choice(call.messages, call.options)
    baseline = tiny_model.encode_choice(call.neutral, call.options)
    choice = tiny_model.choose(prompt, answers, call.options, lambda: False, baseline)
    scores = np.array(score_options(tiny_model.decoder, prompt, answers)) - score_options(tiny_model.decoder, *baseline)
    assert list(choice.scores.values()) == pytest.approx(option_probabilities(list(scores)), rel=1e-4)
    assert list(choice.scores) == request.categories and sum(choice.scores.values()) == pytest.approx(1.0)
    assert choice.best in request.categories


@pytest.fixture
async def engine(tmp_path: Path, tiny_model_dir: Path) -> AsyncIterator[InferenceEngine]:
    (tmp_path / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    engine = InferenceEngine(tmp_path, {"classify": "tiny"}, execution_provider="cpu", intra_op_threads=1)
    await engine.start()
    yield engine
    await engine.close()


async def test_the_engine_passes_the_neutral_prompt_to_the_model(
    engine: InferenceEngine, tiny_model: LanguageModel
) -> None:
    messages = [Message("user", "Classify: the match ended two all.")]
    neutral = [Message("user", "Classify: N/A")]
    options = ["sports", "business"]
    choice = await engine.choose("classify", Choose(messages=messages, options=options, neutral=neutral))
    prompt, answers = tiny_model.encode_choice(messages, options)
    want = tiny_model.choose(prompt, answers, options, lambda: False, tiny_model.encode_choice(neutral, options))
    plain = await engine.choose("classify", Choose(messages=messages, options=options))
    assert choice.scores == pytest.approx(want.scores, rel=1e-5)
    assert choice.scores != pytest.approx(plain.scores, rel=1e-3)
