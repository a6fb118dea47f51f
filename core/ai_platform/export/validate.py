"""Validates an exported graph against its torch fp32 source: one measurement, whatever the precision.

The calibration text (``calibration.py``) goes through torch in one forward pass, the reference, and
through the ONNX graph the way the server runs it: one prefill, then the last ``DECODE_STEPS`` tokens one
at a time through the KV cache. Their next-token distributions at every position give the agreement
(``agreement.py``); an fp32 graph must moreover match torch's logits to ``LOGIT_TOLERANCE``, or it computes
something else. A short greedy answer of the ONNX graph is recorded too, for the runtime's tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ai_platform.export.agreement import MIN_POSITIONS, Agreement, ValidationFailed, measure
from ai_platform.export.calibration import TEXT
from ai_platform.export.progress import bar
from ai_platform.runtime.scheduler import finish_reason

# Enough single steps to cover the KV cache of both graph kinds (past read, present written, positions).
DECODE_STEPS = 32
NEW_TOKENS = 8
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in 12 words."}]
# fp32 on both sides; observed differences are ~1e-5, a broken graph is off by whole units.
LOGIT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class KnownAnswer:
    """A chat prompt and the ONNX graph's greedy ids for it; export.json keeps it for runtime tests."""

    messages: list[dict[str, str]]
    prompt_ids: list[int]
    greedy_ids: list[int]


def validate(hf_dir: Path, onnx_dir: Path, model_file: str, *, exact: bool) -> tuple[KnownAnswer, Agreement]:
    """Measure the graph ``onnx_dir / model_file`` against the torch model in ``hf_dir`` on the calibration text.

    With ``exact`` (fp32 exports) raises ``ValidationFailed`` unless every logit is within ``LOGIT_TOLERANCE``
    of torch's; quantized exports drift by design, and their agreement is judged by the caller.
    """
    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)  # the tokenizer that ships, not the source one
    config = json.loads((onnx_dir / "config.json").read_text())
    ids: list[int] = tokenizer(TEXT)["input_ids"][: config["max_position_embeddings"]]
    if len(ids) < MIN_POSITIONS:
        raise ValueError(f"the calibration text is {len(ids)} tokens for this model, fewer than {MIN_POSITIONS}")
    reference = _torch_logits(hf_dir, ids)
    decoder = _OnnxDecoder(onnx_dir / model_file, config)
    rows = [decoder.run(ids[:-DECODE_STEPS])]
    with bar("ONNX decode steps", DECODE_STEPS, "tok") as done:
        for token in ids[-DECODE_STEPS:]:
            rows.append(decoder.run([token]))
            done.update()
    agreement = measure(reference, np.concatenate(rows))
    if exact and agreement.max_logit_diff > LOGIT_TOLERANCE:
        raise ValidationFailed(
            f"ONNX logits differ from torch's by {agreement.max_logit_diff:.2e} (tolerance {LOGIT_TOLERANCE}) "
            f"on the calibration text; top-1 agreement {agreement.top1:.3f}"
        )
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_ids: list[int] = tokenizer(prompt)["input_ids"]
    answer = KnownAnswer(MESSAGES, prompt_ids, _OnnxDecoder(onnx_dir / model_file, config).greedy(prompt_ids))
    return answer, agreement


def _torch_logits(hf_dir: Path, ids: list[int]) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)  # in eval mode
    with torch.inference_mode():
        logits: np.ndarray = model(torch.tensor([ids])).logits[0].float().numpy()
    return logits


class _OnnxDecoder:
    """One sequence through an exported graph and its KV cache, as the server feeds it."""

    def __init__(self, model_path: Path, config: dict[str, int]) -> None:
        self._session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        self._outputs = [output.name for output in self._session.get_outputs()]
        self._inputs = {arg.name for arg in self._session.get_inputs()}
        # Past inputs are [batch, kv_heads, past_len, head_dim]; builder graphs leave head_dim symbolic.
        heads = config["num_attention_heads"]
        kv_shape = (
            1,
            config.get("num_key_value_heads") or heads,
            0,
            config.get("head_dim") or config["hidden_size"] // heads,
        )
        self._past = {
            name: np.zeros(kv_shape, dtype=np.float32) for name in self._inputs if name.startswith("past_key_values.")
        }
        self._length = 0

    def run(self, ids: list[int]) -> np.ndarray:
        """Feed ``ids`` after what came before; returns their next-token logits, [len(ids), vocab]."""
        start, self._length = self._length, self._length + len(ids)
        feeds = {
            "input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, self._length), dtype=np.int64),
            **self._past,
        }
        if "position_ids" in self._inputs:  # builder graphs derive positions from the mask
            feeds["position_ids"] = np.arange(start, self._length, dtype=np.int64)[None]
        if "num_logits_to_keep" in self._inputs:
            feeds["num_logits_to_keep"] = np.array(len(ids), dtype=np.int64)
        outputs = dict(zip(self._outputs, self._session.run(None, feeds), strict=True))
        self._past = {
            name.replace("present.", "past_key_values."): value
            for name, value in outputs.items()
            if name.startswith("present.")
        }
        logits: np.ndarray = outputs["logits"][0, -len(ids) :]
        return logits

    def greedy(self, prompt_ids: list[int]) -> list[int]:
        """``NEW_TOKENS`` greedy ids after ``prompt_ids`` (not stopping at an end-of-sequence token)."""
        tokens: list[int] = []
        logits = self.run(prompt_ids)[-1]
        while True:
            tokens.append(int(logits.argmax()))
            # The runtime's stop check, with no eos ids: the answer ends on its length alone.
            if finish_reason(tokens[-1], len(tokens), NEW_TOKENS, eos_ids=()) is not None:
                return tokens
            logits = self.run(tokens[-1:])[-1]
