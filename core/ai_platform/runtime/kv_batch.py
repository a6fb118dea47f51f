"""KV caches of a changing set of sequences that decode together, one token per row per step.

What the model runner (``model_runner``) executes on: each layout holds the batch's caches and
feeds them to the graph the way its shape needs (``step``). A sequence's prompt is prefilled alone
(``prefill``, chunk by chunk, reusing the prefix cache's positions) and merged in as the last row
(``join``); sequences leave with ``remove`` (the last row moves into the freed one), so rows stay packed.
Two layouts, one per graph shape (see ``onnx_model``):

* :class:`PaddedBatch` (optimum graphs): left-padded KV, re-padded when a longer sequence
  joins; the graph returns a fresh, one-longer copy of the whole cache every step.
* :class:`SharedBufferBatch` (GroupQueryAttention graphs): one preallocated buffer per
  layer, rows right-padded; past and present are bound to the same memory, so each step
  writes its new position in place and allocates nothing.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Protocol

import numpy as np

from ai_platform.runtime.generation import prefill_chunks
from ai_platform.runtime.onnx_model import KEEP_LOGITS_INPUT, OnnxDecoder
from ai_platform.runtime.prefix_cache import PrefixCache

# One prompt's prefill, one chunk per ``next()``; returns (logits of its last position, its KV cache).
Prefill = Generator[None, None, tuple[np.ndarray, list[np.ndarray]]]

# Buffer growth granularity: a sequence crossing a multiple of this costs one copy.
LENGTH_STEP = 256


class DecodeBatch(Protocol):
    """The sequences of one model that currently decode together."""

    @property
    def size(self) -> int: ...

    @property
    def bytes_per_position(self) -> int:
        """Memory one position of one row takes while decoding (every layer's key and value)."""
        ...

    def prefill(self, prompt: Sequence[int]) -> Prefill:
        """Prefill ``prompt`` alone, one chunk per iteration (the prefix cache's positions reused)."""
        ...

    def join(self, past: list[np.ndarray]) -> None:
        """Add a prefilled sequence (its one-row KV cache) as the new last row."""
        ...

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        """Feed one token per row; returns logits [size, vocab] for each row's next token."""
        ...

    def remove(self, row: int) -> None:
        """Drop ``row``; the last row takes its place."""
        ...


def new_batch(
    decoder: OnnxDecoder, cache: PrefixCache | None = None, *, max_rows: int = 2**31, max_bytes: int = 2**62
) -> DecodeBatch:
    """The batch layout that suits ``decoder``'s graph; prompts reuse ``cache``'s prefixes.

    ``max_rows`` and ``max_bytes`` cap how far preallocated buffers grow ahead of need
    (what the batch may hold is the scheduler's decision).
    """
    if decoder.fused_attention:
        return SharedBufferBatch(decoder, cache, max_rows=max_rows, max_bytes=max_bytes)
    return PaddedBatch(decoder, cache)


def _pad_left(array: np.ndarray, axis: int, length: int) -> np.ndarray:
    missing = length - array.shape[axis]
    if missing == 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (missing, 0)
    return np.pad(array, widths)


class _DecodeBatchBase:
    """What both layouts share: a prompt is prefilled alone, the same way, before it joins."""

    def __init__(self, decoder: OnnxDecoder, cache: PrefixCache | None) -> None:
        self._decoder = decoder
        self._cache = cache
        layer_bytes = decoder.kv_heads * decoder.head_dim * np.dtype(decoder.kv_dtype).itemsize
        self.bytes_per_position = len(decoder.past_names) * layer_bytes

    def prefill(self, prompt: Sequence[int]) -> Prefill:
        return prefill_chunks(self._decoder, prompt, self._cache)


class PaddedBatch(_DecodeBatchBase):
    """Left-padded batch over an optimum graph (attention mask + explicit positions)."""

    def __init__(self, decoder: OnnxDecoder, cache: PrefixCache | None = None) -> None:
        super().__init__(decoder, cache)
        self.bytes_per_position *= 2  # each step's present cache is a new copy beside the past
        self._past: list[np.ndarray] = decoder.empty_past(0)
        self._mask = np.zeros((0, 0), dtype=np.int64)
        self._positions = np.zeros((0, 1), dtype=np.int64)

    @property
    def size(self) -> int:
        return self._mask.shape[0]

    def join(self, past: list[np.ndarray]) -> None:
        prompt_length = past[0].shape[2]
        length = max(self._mask.shape[1], prompt_length)
        self._past = [
            np.concatenate([_pad_left(ours, 2, length), _pad_left(theirs, 2, length)])
            for ours, theirs in zip(self._past, past, strict=True)
        ]
        self._mask = np.concatenate(
            [_pad_left(self._mask, 1, length), _pad_left(np.ones((1, prompt_length), np.int64), 1, length)]
        )
        self._positions = np.concatenate([self._positions, [[prompt_length]]])

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        self._mask = np.concatenate([self._mask, np.ones((self.size, 1), np.int64)], axis=1)
        ids = np.asarray(tokens, dtype=np.int64)[:, None]
        logits, self._past = self._decoder.forward(ids, self._mask, self._positions, self._past, keep_logits=1)
        self._positions += 1
        return logits[:, -1]

    def remove(self, row: int) -> None:
        keep = list(range(self.size - 1))
        if row < len(keep):
            keep[row] = self.size - 1
        self._mask = self._mask[keep]
        self._positions = self._positions[keep]
        self._past = [layer[keep] for layer in self._past]
        # Columns that are padding in every remaining row are dead weight in each step.
        start = int(np.argmax(self._mask.any(axis=0))) if self.size else self._mask.shape[1]
        if start:
            self._mask = self._mask[:, start:]
            self._past = [layer[:, :, start:] for layer in self._past]


class SharedBufferBatch(_DecodeBatchBase):
    """Right-padded batch over a GroupQueryAttention graph, decoding in place in shared buffers."""

    def __init__(
        self,
        decoder: OnnxDecoder,
        cache: PrefixCache | None = None,
        *,
        max_rows: int = 2**31,
        max_bytes: int = 2**62,
    ) -> None:
        super().__init__(decoder, cache)
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._lengths = np.zeros(0, dtype=np.int64)  # valid positions per row
        self._buffers: list[np.ndarray] = []
        self._logits = np.zeros((0, 1, decoder.vocab_size), dtype=decoder.logits_dtype)
        self._binding = decoder.session.io_binding()
        # Bumped whenever the buffers or logits are replaced or freed: the KV and logits
        # bindings hold raw pointers into them, so any new generation must be bound again.
        # (Comparing addresses is not enough: the allocator may hand a new buffer the old
        # address of one layer while the others moved.)
        self._generation = 0
        self._bound: tuple[int, int] | None = None  # (rows, generation) the binding points into
        self._keep_one = np.asarray(1, dtype=np.int64)
        # Bound inputs point into these arrays: they must live until the next step replaces them.
        self._ids = np.zeros((0, 1), dtype=decoder.ids_dtype)
        self._mask = np.zeros((0, 0), dtype=decoder.mask_dtype)
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    def _reserve(self, rows: int, length: int) -> None:
        """Grow the buffers to hold ``rows`` rows of ``length`` positions, keeping their contents.

        Rows double (a burst of joins costs few copies) and lengths grow by ``LENGTH_STEP``,
        each only when it must: longer rows keep the row count (doubling it on every length
        step made 7 sequences hold 64 rows and, under the soak, 20 GB). Rows beyond those in
        use are kept only within ``max_rows`` and ``max_bytes``.
        """
        have_rows, have_length = (self._buffers[0].shape[0], self._buffers[0].shape[2]) if self._buffers else (0, 0)
        if rows <= have_rows and length <= have_length:
            return
        length = min(-(-max(length, have_length) // LENGTH_STEP) * LENGTH_STEP, self._decoder.max_positions)
        wanted = 2 * have_rows if rows > have_rows else have_rows
        rows = max(rows, min(wanted, self._max_rows, self._max_bytes // (length * self.bytes_per_position)))
        shape = (rows, self._decoder.kv_heads, length, self._decoder.head_dim)
        # Bound pointers go stale from here on (see ``step``).
        self._generation += 1
        # One layer at a time, each old layer freed once copied: growing costs one extra layer, not a second cache.
        old_layers = self._buffers[::-1]
        self._buffers = []
        for _ in self._decoder.past_names:
            grown = np.zeros(shape, dtype=self._decoder.kv_dtype)
            if old_layers:
                old = old_layers.pop()
                grown[: self._size, :, : old.shape[2]] = old[: self._size]
                del old
            self._buffers.append(grown)
        lengths = np.zeros(rows, dtype=np.int64)
        lengths[: self._size] = self._lengths[: self._size]
        self._lengths = lengths
        self._logits = np.zeros((rows, 1, self._decoder.vocab_size), dtype=self._decoder.logits_dtype)

    # A prompt is prefilled without sharing (the graph appends to the past it is given), then
    # copied into its row: one copy per sequence, and chunked prefill works unchanged.
    def join(self, past: list[np.ndarray]) -> None:
        row, length = self._size, past[0].shape[2]
        self._reserve(row + 1, length + 1)
        for buffer, layer in zip(self._buffers, past, strict=True):
            buffer[row, :, :length] = layer[0]
        self._lengths[row] = length
        self._size += 1

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        rows = self._size
        total = int(self._lengths[:rows].max()) + 1
        self._reserve(rows, total)
        binding = self._binding
        # The cache and logits bindings (120 calls for 60 KV tensors) change only with the row
        # count or new buffers; ids and mask change every step and are bound by name again.
        if self._bound != (rows, self._generation):
            self._bind_buffers(rows)
            self._bound = (rows, self._generation)
        self._ids = np.asarray(tokens, dtype=self._decoder.ids_dtype)[:, None]
        self._mask = (np.arange(total) <= self._lengths[:rows, None]).astype(self._decoder.mask_dtype)
        binding.bind_cpu_input("input_ids", self._ids)
        binding.bind_cpu_input("attention_mask", self._mask)
        self._decoder.session.run_with_iobinding(binding)
        self._lengths[:rows] += 1
        return self._logits[:rows, 0]

    def _bind_buffers(self, rows: int) -> None:
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        if self._decoder.keeps_logits:
            binding.bind_cpu_input(KEEP_LOGITS_INPUT, self._keep_one)
        kv_type = self._decoder.kv_dtype
        for past, present, buffer in zip(
            self._decoder.past_names, self._decoder.present_names, self._buffers, strict=True
        ):
            shape = (rows, *buffer.shape[1:])
            pointer = buffer.ctypes.data  # rows are the leading axis: the first `rows` are contiguous
            binding.bind_input(past, "cpu", 0, kv_type, shape, pointer)
            binding.bind_output(present, "cpu", 0, kv_type, shape, pointer)
        logits_shape = (rows, 1, self._logits.shape[2])
        binding.bind_output("logits", "cpu", 0, self._logits.dtype, logits_shape, self._logits.ctypes.data)

    def remove(self, row: int) -> None:
        last = self._size - 1
        if row != last:
            length = int(self._lengths[last])
            for buffer in self._buffers:
                buffer[row, :, :length] = buffer[last, :, :length]
            self._lengths[row] = length
        self._size -= 1
        if self._size == 0:  # idle: give the memory back, and no pointer into it may stay bound
            self._binding.clear_binding_inputs()
            self._binding.clear_binding_outputs()
            self._bound = None
            self._generation += 1
            self._buffers = []
            self._lengths = np.zeros(0, dtype=np.int64)
            self._logits = np.zeros((0, 1, self._decoder.vocab_size), dtype=self._decoder.logits_dtype)
