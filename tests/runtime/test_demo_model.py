"""The runtime on the real demo model, against the reference the export tool recorded from torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ai_platform.operations import Message
from ai_platform.runtime.generation import greedy_generate
from ai_platform.runtime.model import LanguageModel

pytestmark = pytest.mark.demo_model


def test_prompt_and_greedy_tokens_match_the_export_reference(demo_model_dir: Path) -> None:
    reference = json.loads((demo_model_dir / "export.json").read_text(encoding="utf-8"))["validation"]
    model = LanguageModel.load(demo_model_dir, execution_provider="cpu", intra_op_threads=None)
    prompt = model.encode_prompt([Message(m["role"], m["content"]) for m in reference["messages"]])
    assert prompt == reference["prompt_ids"]
    expected = reference["greedy_ids"]
    result = greedy_generate(model.decoder, prompt, max_new_tokens=len(expected), eos_ids=model.eos_ids)
    produced = result.tokens + ([expected[-1]] if result.finish_reason == "stop" else [])
    assert produced == expected
