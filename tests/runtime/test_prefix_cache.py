"""The prefix cache's bookkeeping (its effect on real models is in test_batching)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ai_platform.operations import Message
from ai_platform.runtime.generation import prefill
from ai_platform.runtime.model import LanguageModel
from ai_platform.runtime.prefix_cache import PrefixCache


def kv(length: int, layers: int = 2) -> list[np.ndarray]:
    """A fake one-row KV cache whose values are the positions, so slices can be checked."""
    return [
        np.broadcast_to(np.arange(length, dtype=np.float32)[None, None, :, None], (1, 2, length, 4)).copy()
    ] * layers


def test_longest_shared_prefix_wins_and_the_last_two_tokens_always_run() -> None:
    cache = PrefixCache()
    assert cache.lookup([1, 2, 3]) == (0, None)
    cache.store([1, 2, 3, 4, 5], kv(5))
    cache.store([1, 2, 9], kv(3))
    length, past = cache.lookup([1, 2, 3, 4, 7, 8])
    assert length == 4 and past is not None
    assert [layer.shape for layer in past] == [(1, 2, 4, 4)] * 2 and past[0].flags.c_contiguous
    assert past[0][0, 0, :, 0].tolist() == [0, 1, 2, 3]
    assert cache.lookup([1, 2, 3, 4, 5])[0] == 3  # the same prompt again: its last two positions are recomputed
    assert cache.lookup([2, 1])[0] == 0
    assert (cache.hits, cache.reused_tokens) == (2, 7)


def test_least_recently_used_prompts_are_evicted_beyond_the_byte_budget() -> None:
    one = sum(layer.nbytes for layer in kv(10))
    cache = PrefixCache(max_bytes=2 * one)
    cache.store([1] * 10, kv(10))
    cache.store([2] * 10, kv(10))
    cache.lookup([1] * 10 + [5, 6])  # [1]* is now the most recently used
    cache.store([3] * 10, kv(10))
    assert cache.lookup([2] * 10 + [5, 6])[0] == 0
    assert cache.lookup([1] * 10 + [5, 6])[0] == 10
    assert cache.lookup([3] * 10 + [5, 6])[0] == 10
    cache.store([4] * 100, kv(100))  # larger than the whole budget: not kept, nothing evicted
    assert cache.lookup([4] * 100 + [5, 6])[0] == 0 and cache.lookup([1] * 10 + [5, 6])[0] == 10


def test_a_zero_budget_keeps_nothing() -> None:
    cache = PrefixCache(max_bytes=0)  # PREFIX_CACHE_MB=0
    cache.store([1, 2, 3], kv(3))
    assert cache.lookup([1, 2, 3, 4]) == (0, None)


@pytest.mark.demo_model
def test_a_cached_prompt_gives_the_same_logits_as_a_cold_prefill(demo_model_dir: Path) -> None:
    """Whatever the cache holds of a prompt, its next-token logits are bit-identical to computing it all."""
    model = LanguageModel.load(demo_model_dir, execution_provider="cpu", intra_op_threads=None)
    prompt = model.encode_prompt([Message("user", "Is this urgent? My internet connection keeps dropping.")])
    cold, _ = prefill(model.decoder, prompt, lambda: False)
    for cached in (len(prompt), len(prompt) - 1, len(prompt) - 2, len(prompt) // 2):
        cache = PrefixCache()
        cache.store(prompt[:cached], prefill(model.decoder, prompt[:cached], lambda: False)[1])
        warm, _ = prefill(model.decoder, prompt, lambda: False, cache)
        assert cache.hits == 1
        np.testing.assert_array_equal(warm, cold, err_msg=f"{cached} of {len(prompt)} positions cached")
