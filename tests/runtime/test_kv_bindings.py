"""SharedBufferBatch's IO binding never points at memory it no longer owns (issue 10).

onnxruntime reads the KV cache from, and writes it to, raw pointers bound once per
layout. Every buffer replacement (growth, or going idle and growing again) must be
bound again. The bug this guards against compared only layer 0's address, so when the
allocator handed layer 0 its old address while the other layers moved, onnxruntime
kept writing KV through freed pointers: wrong tokens first, heap corruption later.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from ai_platform.operations import Message
from ai_platform.runtime import kv_batch
from ai_platform.runtime.generation import Generated
from ai_platform.runtime.kv_batch import SharedBufferBatch
from ai_platform.runtime.model import LanguageModel
from ai_platform.runtime.model_runner import ModelRunner
from ai_platform.runtime.prefix_cache import PrefixCache
from ai_platform.runtime.scheduler import Scheduler, SequenceRequest
from runtime_reference import greedy_generate


class RecordingBinding:
    """An IO binding that remembers the pointers given to ``bind_input`` (onnxruntime cannot list its inputs)."""

    def __init__(self, binding: Any) -> None:
        self._wrapped = binding
        self.inputs: dict[str, tuple[int, tuple[int, ...]]] = {}  # name -> (pointer, shape)

    def bind_input(self, name: str, device: str, device_id: int, element_type: Any, shape: Any, pointer: int) -> None:
        self.inputs[name] = (pointer, tuple(shape))
        self._wrapped.bind_input(name, device, device_id, element_type, shape, pointer)

    def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
        self.inputs[name] = (array.ctypes.data, array.shape)
        self._wrapped.bind_cpu_input(name, array)

    def clear_binding_inputs(self) -> None:
        self.inputs.clear()
        self._wrapped.clear_binding_inputs()

    def __getattr__(self, name: str) -> Any:  # bind_output, get_outputs, _iobinding (what run_with_iobinding uses)
        return getattr(self._wrapped, name)


def bound_pointers_are_live(batch: SharedBufferBatch) -> None:
    """Every KV input and output bound (past and present KV, logits) is at the address of the batch's current arrays."""
    decoder = batch._decoder
    outputs = batch._binding.get_outputs()
    assert len(outputs) == len(decoder.present_names) + 1
    live = [buffer.ctypes.data for buffer in batch._buffers] + [batch._logits.ctypes.data]
    bound = [value.data_ptr() for value in outputs]
    stale = [name for name, b, a in zip([*decoder.present_names, "logits"], bound, live, strict=True) if b != a]
    assert not stale, f"{len(stale)} of {len(live)} output bindings point at replaced memory: {stale[:4]}"
    binding = batch._binding
    assert isinstance(binding, RecordingBinding)
    rows = batch.size
    inputs = [binding.inputs.get(name) for name in decoder.past_names]
    expected = [(buffer.ctypes.data, (rows, *buffer.shape[1:])) for buffer in batch._buffers]
    stale = [name for name, b, a in zip(decoder.past_names, inputs, expected, strict=True) if b != a]
    assert not stale, f"{len(stale)} of {len(expected)} past inputs are bound to replaced memory: {stale[:4]}"
    for name, array in (("input_ids", batch._ids), ("attention_mask", batch._mask)):
        assert binding.inputs[name] == (array.ctypes.data, array.shape), name


def run(batch: Scheduler, model: LanguageModel, prompts: list[list[int]], budget: int) -> list[Generated]:
    results: dict[int, Generated] = {}

    def finisher(index: int) -> Callable[[Generated | None, BaseException | None], None]:
        def finish(result: Generated | None, error: BaseException | None) -> None:
            assert error is None, error
            assert result is not None
            results[index] = result

        return finish

    shared: SharedBufferBatch = batch._runner.batch  # type: ignore[assignment]
    if not isinstance(shared._binding, RecordingBinding):
        shared._binding = RecordingBinding(shared._binding)  # type: ignore[assignment]
    step = SharedBufferBatch.step

    def checked_step(tokens: list[int]) -> np.ndarray:
        logits = step(shared, tokens)
        bound_pointers_are_live(shared)  # what the forward pass just read and wrote
        return logits

    shared.step = checked_step  # type: ignore[method-assign]
    for index, prompt in enumerate(prompts):
        batch.admit(SequenceRequest(prompt, budget, frozenset(), finisher(index)))
    while len(results) < len(prompts):
        batch.step()
    assert batch.active == 0
    return [results[index] for index in range(len(prompts))]


def encode(model: LanguageModel, texts: list[str]) -> list[list[int]]:
    return [model.encode_prompt([Message("user", text)]) for text in texts]


class _ReusingZeros:
    """``np.zeros`` where the first array of each run of same-shaped requests reuses one address.

    It stands in for an allocator that hands a new batch's layer 0 (and its logits) the
    address they had before the batch went idle, while the other layers move. Every array
    handed out is kept alive, so a stale binding reads old memory instead of corrupting the heap.
    """

    def __init__(self) -> None:
        self._first: dict[tuple[Any, ...], np.ndarray] = {}
        self._last_key: tuple[Any, ...] | None = None
        self.kept: list[np.ndarray] = []

    def __call__(self, shape: Any, dtype: Any = float) -> np.ndarray:
        key = (tuple(np.atleast_1d(shape)), np.dtype(dtype).str)
        first_of_run, self._last_key = key != self._last_key, key
        if first_of_run and key in self._first:
            array = self._first[key]
            array.fill(0)
            return array
        array = np.zeros(shape, dtype=dtype)
        self._first.setdefault(key, array)
        self.kept.append(array)
        return array


def test_buffers_that_move_while_layer_0_keeps_its_address_are_bound_again(
    tiny_genai_model: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_genai_model
    prompts = encode(model, ["Translate to French: good morning, everyone."])
    expected = [greedy_generate(model.decoder, prompt, max_new_tokens=12, eos_ids=()) for prompt in prompts]
    zeros = _ReusingZeros()
    numpy_with_reusing_zeros = type("numpy", (), {"__getattr__": lambda _, name: getattr(np, name)})()
    numpy_with_reusing_zeros.zeros = zeros
    monkeypatch.setattr(kv_batch, "np", numpy_with_reusing_zeros)
    batch = Scheduler(ModelRunner(SharedBufferBatch(model.decoder)), max_batch=4)
    # One sequence per round: grow -> idle -> grow to the same shape, layer 0 and logits at their old addresses.
    for round_ in range(3):
        assert run(batch, model, prompts, 12) == expected, f"round {round_}"


@pytest.mark.parametrize("cached", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_grow_idle_grow_cycles_decode_exactly_and_bind_live_memory(
    tiny_genai_model: LanguageModel, cached: bool
) -> None:
    """80 rounds of batches that empty and grow again, to different sizes and lengths (the real allocator)."""
    model = tiny_genai_model
    texts = [f"Summarize item {i}: " + "words and more words " * (i % 7) for i in range(9)]
    prompts = encode(model, texts)
    alone = {tuple(p): greedy_generate(model.decoder, p, max_new_tokens=10, eos_ids=()) for p in prompts}
    cache = PrefixCache(64 * 2**10) if cached else None  # small: entries are evicted as rounds go on
    batch = Scheduler(ModelRunner(SharedBufferBatch(model.decoder, cache)), max_batch=8)
    rng = np.random.default_rng(7)
    for round_ in range(80):
        chosen = [prompts[i] for i in rng.choice(len(prompts), size=int(rng.integers(1, 8)))]
        results = run(batch, model, chosen, 10)
        assert results == [alone[tuple(p)] for p in chosen], f"round {round_}"
