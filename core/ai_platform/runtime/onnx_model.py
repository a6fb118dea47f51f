"""An onnxruntime session over optimum's ``text-generation-with-past`` decoder graph.

Inputs: ``input_ids``, ``attention_mask``, ``position_ids`` (optional in some
exports) and ``past_key_values.{i}.key/value`` shaped [batch, kv_heads,
past_len, head_dim]. Outputs: ``logits`` for every input position and
``present.{i}.key/value`` (the past with the new positions appended).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
EXECUTION_PROVIDERS = ("auto", "cpu", "cuda")

_PAST_NAME = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_DTYPES: dict[str, type[np.generic]] = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def select_providers(execution_provider: str) -> list[str]:
    """onnxruntime providers for the ``execution_provider`` setting ("auto", "cpu" or "cuda")."""
    available = ort.get_available_providers()
    if execution_provider == "cpu":
        return [CPU]
    if execution_provider == "cuda":
        if CUDA not in available:
            raise RuntimeError(f"{CUDA} is not available in this onnxruntime build (available: {', '.join(available)})")
        return [CUDA, CPU]
    if execution_provider == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    raise ValueError(f"execution provider must be one of {', '.join(EXECUTION_PROVIDERS)}, not {execution_provider!r}")


class OnnxDecoder:
    """One inference session of a decoder-only model with a KV cache.

    Not thread-safe by design: the engine runs all of a model's work on one thread.
    """

    def __init__(
        self,
        model_file: Path,
        config: Mapping[str, Any],
        *,
        execution_provider: str = "auto",
        intra_op_threads: int | None = None,
    ) -> None:
        providers = select_providers(execution_provider)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        self._session = ort.InferenceSession(str(model_file), sess_options=options, providers=providers)
        self.provider: str = self._session.get_providers()[0]
        if execution_provider == "cuda" and self.provider != CUDA:
            # onnxruntime silently falls back to CPU when the CUDA libraries fail to load.
            raise RuntimeError(f"{CUDA} failed to initialise (session runs on {self.provider})")

        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        missing = [name for name in ("input_ids", "attention_mask") if name not in inputs]
        missing += [name for name in ("logits",) if name not in outputs]
        if missing:
            raise ValueError(f"not an optimum text-generation-with-past graph: missing {', '.join(missing)}")
        self._has_position_ids = "position_ids" in inputs
        past = sorted(
            (int(m[1]), m[2] == "value", name) for name in inputs if (m := _PAST_NAME.match(name)) is not None
        )
        self._past_names = [name for _, _, name in past]
        self._present_names = [name.replace("past_key_values.", "present.", 1) for name in self._past_names]
        if not self._past_names or any(name not in outputs for name in self._present_names):
            raise ValueError("graph has no KV cache (export with task text-generation-with-past)")
        kv_type = inputs[self._past_names[0]].type
        if kv_type not in _DTYPES:
            raise ValueError(f"unsupported KV-cache type {kv_type}")
        self._kv_dtype = _DTYPES[kv_type]

        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        self._kv_heads = int(config.get("num_key_value_heads") or heads)
        self._head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        self.max_positions = int(config["max_position_embeddings"])
        if len(self._past_names) != 2 * layers:
            raise ValueError(f"graph has {len(self._past_names) // 2} KV layers, config.json says {layers}")
        graph_shape = inputs[self._past_names[0]].shape
        for axis, expected in ((1, self._kv_heads), (3, self._head_dim)):
            if isinstance(graph_shape[axis], int) and graph_shape[axis] != expected:
                raise ValueError(f"KV-cache shape {graph_shape} does not match config.json ({expected} at axis {axis})")

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A zero-length KV cache for ``batch`` rows, in the graph's order."""
        shape = (batch, self._kv_heads, 0, self._head_dim)
        return [np.zeros(shape, dtype=self._kv_dtype) for _ in self._past_names]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: Sequence[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One pass over the new positions: (logits [batch, new, vocab], present KV cache).

        ``attention_mask`` covers past and new positions; all arrays are int64.
        """
        feed: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._has_position_ids:
            feed["position_ids"] = position_ids
        feed.update(zip(self._past_names, past, strict=True))
        logits, *present = self._session.run(["logits", *self._present_names], feed)
        return logits, present
