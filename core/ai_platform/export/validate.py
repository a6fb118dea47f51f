"""Checks an exported ONNX model against its torch original on a short greedy generation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ai_platform.export.progress import bar

NEW_TOKENS = 8
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in 12 words."}]
# fp32 on both sides; observed differences are ~1e-5, a broken graph is off by whole units.
LOGIT_TOLERANCE = 1e-3
# Quantized weights move logits by whole units too (int4 SmolLM2: ~10), enough to swap near ties (int4
# flips the tiny random model's first token to torch's third), while a broken graph picks noise.
QUANTIZED_TOP_K = 5


class ValidationFailed(RuntimeError):
    """The ONNX model does not generate what the torch model generates."""


@dataclass(frozen=True)
class KnownAnswer:
    """A chat prompt and the greedy ids both models produced; export.json keeps it for runtime tests."""

    messages: list[dict[str, str]]
    prompt_ids: list[int]
    greedy_ids: list[int]


def compare_greedy(hf_dir: Path, onnx_dir: Path, model_file: str, *, exact: bool) -> tuple[KnownAnswer, float]:
    """Greedy-decode a chat prompt with torch and with the ONNX graph (each through its KV cache).

    Returns the answer and the largest logit difference. With ``exact`` (fp32 exports), raises
    ``ValidationFailed`` unless both pick the same tokens with nearly the same logits; quantized
    exports drift by design, so for them the first token must be among torch's top ``QUANTIZED_TOP_K``.
    """
    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)  # the tokenizer that ships, not the source one
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_ids: list[int] = tokenizer(prompt)["input_ids"]
    expected, expected_logits = _torch_greedy(hf_dir, prompt_ids)
    actual, actual_logits = _onnx_greedy(onnx_dir / model_file, prompt_ids)
    diff = float(np.abs(expected_logits - actual_logits).max())
    if exact and actual != expected:
        raise ValidationFailed(f"ONNX greedy ids {actual} differ from torch's {expected}, prompt {prompt_ids}")
    first = expected_logits[0]
    if (rank := int((first > first[actual[0]]).sum())) >= QUANTIZED_TOP_K:
        raise ValidationFailed(
            f"ONNX's first token {actual[0]} is torch's choice no. {rank + 1} (greedy ids {actual}, torch's "
            f"{expected}, prompt {prompt_ids})"
        )
    if exact and diff > LOGIT_TOLERANCE:
        raise ValidationFailed(f"ONNX logits differ from torch's by {diff:.2e} (tolerance {LOGIT_TOLERANCE})")
    return KnownAnswer(MESSAGES, prompt_ids, actual), diff


def _torch_greedy(hf_dir: Path, prompt_ids: list[int]) -> tuple[list[int], np.ndarray]:
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)  # in eval mode
    fresh, past = prompt_ids, None
    tokens, steps = [], []
    with torch.inference_mode(), bar("torch greedy", NEW_TOKENS, "tok") as done:
        for _ in range(NEW_TOKENS):
            output = model(torch.tensor([fresh]), past_key_values=past, use_cache=True)
            logits = output.logits[0, -1].numpy()
            past = output.past_key_values
            fresh = [int(logits.argmax())]
            tokens += fresh
            steps.append(logits)
            done.update()
    return tokens, np.stack(steps)


def _onnx_greedy(model_path: Path, prompt_ids: list[int]) -> tuple[list[int], np.ndarray]:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    output_names = [output.name for output in session.get_outputs()]
    # Past inputs are [batch, kv_heads, past_len, head_dim]; builder graphs leave head_dim symbolic.
    config = json.loads((model_path.parent / "config.json").read_text())
    heads = config["num_attention_heads"]
    kv_shape = (
        1,
        config.get("num_key_value_heads") or heads,
        0,
        config.get("head_dim") or config["hidden_size"] // heads,
    )
    past = {
        arg.name: np.zeros(kv_shape, dtype=np.float32)
        for arg in session.get_inputs()
        if arg.name.startswith("past_key_values.")
    }
    names = {arg.name for arg in session.get_inputs()}
    fresh, length = prompt_ids, 0
    tokens, steps = [], []
    with bar("ONNX greedy", NEW_TOKENS, "tok") as done:
        for _ in range(NEW_TOKENS):
            length += len(fresh)
            feeds = {
                "input_ids": np.array([fresh], dtype=np.int64),
                "attention_mask": np.ones((1, length), dtype=np.int64),
                **past,
            }
            if "position_ids" in names:  # builder graphs derive positions from the mask
                feeds["position_ids"] = np.arange(length - len(fresh), length, dtype=np.int64)[None]
            if "num_logits_to_keep" in names:
                feeds["num_logits_to_keep"] = np.array(1, dtype=np.int64)
            outputs = dict(zip(output_names, session.run(None, feeds), strict=True))
            logits = outputs["logits"][0, -1]
            past = {
                name.replace("present.", "past_key_values."): value
                for name, value in outputs.items()
                if name.startswith("present.")
            }
            fresh = [int(logits.argmax())]
            tokens += fresh
            steps.append(logits)
            done.update()
    return tokens, np.stack(steps)
