"""The prefix cache's bookkeeping (its effect on real models is in test_batching)."""

from __future__ import annotations

import numpy as np

from ai_platform.runtime.prefix_cache import PrefixCache


def kv(length: int, layers: int = 2) -> list[np.ndarray]:
    """A fake one-row KV cache whose values are the positions, so slices can be checked."""
    return [
        np.broadcast_to(np.arange(length, dtype=np.float32)[None, None, :, None], (1, 2, length, 4)).copy()
    ] * layers


def test_longest_shared_prefix_wins_and_the_last_token_always_runs() -> None:
    cache = PrefixCache()
    assert cache.lookup([1, 2, 3]) == (0, None)
    cache.store([1, 2, 3, 4, 5], kv(5))
    cache.store([1, 2, 9], kv(3))
    length, past = cache.lookup([1, 2, 3, 4, 7, 8])
    assert length == 4 and past is not None
    assert [layer.shape for layer in past] == [(1, 2, 4, 4)] * 2 and past[0].flags.c_contiguous
    assert past[0][0, 0, :, 0].tolist() == [0, 1, 2, 3]
    assert cache.lookup([1, 2, 3, 4, 5])[0] == 4  # the same prompt again: its last position is recomputed
    assert cache.lookup([2, 1])[0] == 0
    assert (cache.hits, cache.reused_tokens) == (2, 8)


def test_least_recently_used_prompts_are_evicted_beyond_the_byte_budget() -> None:
    one = sum(layer.nbytes for layer in kv(10))
    cache = PrefixCache(max_bytes=2 * one)
    cache.store([1] * 10, kv(10))
    cache.store([2] * 10, kv(10))
    cache.lookup([1] * 10 + [5])  # [1]* is now the most recently used
    cache.store([3] * 10, kv(10))
    assert cache.lookup([2] * 10 + [5])[0] == 0
    assert cache.lookup([1] * 10 + [5])[0] == 10
    assert cache.lookup([3] * 10 + [5])[0] == 10
    cache.store([4] * 100, kv(100))  # larger than the whole budget: not kept, nothing evicted
    assert cache.lookup([4] * 100 + [5])[0] == 0 and cache.lookup([1] * 10 + [5])[0] == 10


def test_a_zero_budget_keeps_nothing() -> None:
    cache = PrefixCache(max_bytes=0)  # PREFIX_CACHE_MB=0
    cache.store([1, 2, 3], kv(3))
    assert cache.lookup([1, 2, 3, 4]) == (0, None)
