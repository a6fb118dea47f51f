"""A long option-scoring prompt shares the model with decoding sequences (issue 11, item 4).

Before, a classify ran alone between two decode steps: every generation on the model
waited for its whole prefill (a 6,000-token classify held a one-sentence summarize for
40 s). Now a job runs one forward pass per turn of the model's loop, in turn with the
batch's decode steps and with other jobs.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from ai_platform.operations import Choose, Generate, Message
from ai_platform.runtime.engine import InferenceEngine
from ai_platform.runtime.generation import Steps
from ai_platform.runtime.model import LanguageModel
from ai_platform.runtime.onnx_model import OnnxDecoder
from runtime_reference import jobs_only_loop

pytestmark = pytest.mark.anyio


def long_text(model: LanguageModel, tokens: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    text = ""
    while len(model.encode_prompt([Message("user", text)])) < tokens:
        text += " ".join(words[i % 6] + str(i) for i in range(50)) + " "
    return text


async def test_a_long_classify_prefill_is_interleaved_with_decoding(
    tiny_model_dir: Path, tmp_path: Path, tiny_model: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    engine = InferenceEngine(
        tmp_path, {"op": "tiny"}, execution_provider="cpu", intra_op_threads=1, isolation="thread", prefix_cache_bytes=0
    )
    await engine.start()
    widths: list[int] = []  # new positions fed by each forward pass, in order
    forward = OnnxDecoder.forward

    def recording_forward(self: OnnxDecoder, input_ids: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        widths.append(input_ids.shape[1])
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(OnnxDecoder, "forward", recording_forward)
    text = long_text(tiny_model, 1700)  # four prefill chunks of 512
    generation = Generate(messages=[Message("user", "Tell me a story.")])

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: engine.generate("op", generation, max_output_tokens=400))
        with anyio.fail_after(10):
            while widths.count(1) < 3:  # the story is decoding
                await anyio.sleep(0.001)
        choice = await engine.choose("op", Choose(messages=[Message("user", text)], options=["sports", "business"]))
        tg.cancel_scope.cancel()
    await engine.close()
    assert set(choice.scores) == {"sports", "business"}
    chunks = [i for i, width in enumerate(widths) if width == 512]
    assert len(chunks) >= 3, widths
    between = widths[chunks[0] : chunks[-1]].count(1)
    assert between >= len(chunks) - 1, f"decode steps during the classify's prefill: {between} ({widths})"


async def test_jobs_take_turns_one_slice_each() -> None:
    order: list[str] = []
    lock = threading.Lock()

    def job(name: str, slices: int) -> Steps[str]:
        for index in range(slices):
            if index:
                yield
            with lock:
                order.append(f"{name}{index}")
            time.sleep(0.1)  # one forward pass
        return name

    worker = jobs_only_loop("m", max_queue=8)
    try:
        async with anyio.create_task_group() as tg:
            results: dict[str, str] = {}

            async def run(name: str, slices: int) -> None:
                results[name] = await worker.run(job(name, slices))

            for name, slices in (("a", 4), ("b", 2), ("c", 1)):
                tg.start_soon(run, name, slices)
                await anyio.sleep(0.05)  # arrive in this order (each starts while the earlier ones run)
    finally:
        await worker.close()
    assert results == {"a": "a", "b": "b", "c": "c"}
    first_b, first_c = order.index("b0"), order.index("c0")
    assert first_b < order.index("a3") and first_c < order.index("a3"), order  # not behind a's whole work
