"""Reuse the KV cache of recent prompts: a new prompt is prefilled only from where it differs.

Every request of an operation starts with the same system prompt and chat template
(tens of tokens; about half of a short summarize prompt), and under causal attention
the keys and values of a prompt's first k positions do not depend on what follows.
So the first k positions of any cached prompt that shares k leading tokens with a new
one are that prompt's KV cache too, and prefill starts at position k.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

# Enough for dozens of typical prompts of a small model (SmolLM2-135M: 46 KB per token in fp32).
DEFAULT_MAX_BYTES = 64 * 2**20

# Prompt positions always computed, even when a cached prompt covers more. onnxruntime runs a
# one-token pass through other kernels than a longer one (in the int4 demo model the last
# position's logits then differ by up to 0.85 from a cold prefill, enough to change a
# classification's scores by a quarter), while passes of two or more tokens give bit-identical
# results whatever the split. Two keep an answer independent of what the cache holds.
MIN_COMPUTED = 2


class _Entry(NamedTuple):
    tokens: np.ndarray  # the prompt, as an array once, for comparing against every new prompt
    past: list[np.ndarray]
    nbytes: int


class PrefixCache:
    """The KV caches of the most recently prefilled prompts of one model, at most ``max_bytes`` in all.

    ``max_bytes=0`` keeps nothing (``PREFIX_CACHE_MB=0``). Used from the model's own thread only.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._bytes = 0
        self.hits = 0  # prompts that reused cached positions
        self.reused_tokens = 0

    def lookup(self, prompt: Sequence[int]) -> tuple[int, list[np.ndarray] | None]:
        """The longest cached prefix of ``prompt`` (leaving at least ``MIN_COMPUTED`` tokens to run) and its KV."""
        wanted = np.asarray(prompt)
        best, best_key = 0, None
        for key, entry in self._entries.items():
            length = min(len(key), len(prompt) - MIN_COMPUTED)
            if length <= best:
                continue
            differs = np.flatnonzero(entry.tokens[:length] != wanted[:length])
            common = int(differs[0]) if differs.size else length
            if common > best:
                best, best_key = common, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        return best, [np.ascontiguousarray(layer[:, :, :best]) for layer in self._entries[best_key].past]

    def store(self, prompt: Sequence[int], past: list[np.ndarray]) -> None:
        """Keep ``past`` (the KV cache of exactly ``prompt``, one row) for later prompts."""
        key = tuple(prompt)
        entry = _Entry(np.asarray(prompt), past, sum(layer.nbytes for layer in past))
        if entry.nbytes > self._max_bytes:
            return
        if key in self._entries:
            self._bytes -= self._entries.pop(key).nbytes
        self._entries[key] = entry
        self._bytes += entry.nbytes
        while self._bytes > self._max_bytes:
            self._bytes -= self._entries.popitem(last=False)[1].nbytes
