"""An onnxruntime session over a decoder graph with a KV cache.

Two graph shapes are served (see ``docs/benchmarks.md`` for how they compare):

* optimum's ``text-generation-with-past`` export: standard ops, inputs ``input_ids``,
  ``attention_mask``, ``position_ids`` and ``past_key_values.{i}.key/value`` shaped
  [batch, kv_heads, past_len, head_dim]; outputs ``logits`` and ``present.{i}.key/value``
  (the past with the new positions appended). Left padding works through the mask.
* onnxruntime-genai's model builder (the folder has ``genai_config.json``): the same
  names without ``position_ids``, fused ``GroupQueryAttention`` that derives each row's
  length from its attention mask (so rows are right-padded) and can update a
  preallocated KV buffer in place when past and present share memory.

Either graph may have the optional ``num_logits_to_keep`` input added at export
(``ai_platform.export.logits``): only the last positions' logits are computed then.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:  # settings reads .env (python-dotenv): the export environment, which imports this, has none
    from ai_platform.settings import ExecutionProvider

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
KEEP_LOGITS_INPUT = "num_logits_to_keep"

_PAST_NAME = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def select_providers(execution_provider: ExecutionProvider) -> list[str]:
    """onnxruntime providers for the ``execution_provider`` setting (checked where it entered: Settings, the engine)."""
    available = ort.get_available_providers()
    if execution_provider == "cpu":
        return [CPU]
    if execution_provider == "cuda":
        if CUDA not in available:
            raise RuntimeError(f"{CUDA} is not available in this onnxruntime build (available: {', '.join(available)})")
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in available else [CPU]  # "auto"


class OnnxDecoder:
    """One inference session of a decoder-only model with a KV cache.

    Not thread-safe by design: the engine runs all of a model's work on one thread.
    ``fused_attention`` is true for onnxruntime-genai builder graphs (GroupQueryAttention).
    """

    def __init__(
        self,
        model_file: Path,
        config: Mapping[str, Any],
        *,
        execution_provider: ExecutionProvider = "auto",
        intra_op_threads: int | None = None,
        fused_attention: bool = False,
    ) -> None:
        providers = select_providers(execution_provider)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # onnxruntime's CPU arena keeps every chunk it ever grew to: after a few long prompts a
        # demo-model process stayed ~80 MB above what it needs, idle, for good. Plain malloc
        # (given back to the system when the batch goes idle, see ``engine_loop.release_free_memory``)
        # decoded and prefilled as fast here (64 tokens: 1.47 s vs 1.51 s; long prefill: 2.31 s vs 2.33 s).
        options.enable_cpu_mem_arena = False
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        self._session = ort.InferenceSession(str(model_file), sess_options=options, providers=providers)
        self.provider: str = self._session.get_providers()[0]
        if execution_provider == "cuda" and self.provider != CUDA:
            # onnxruntime silently falls back to CPU when the CUDA libraries fail to load.
            raise RuntimeError(f"{CUDA} failed to initialise (session runs on {self.provider})")
        self.fused_attention = fused_attention

        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        missing = [name for name in ("input_ids", "attention_mask") if name not in inputs]
        missing += [name for name in ("logits",) if name not in outputs]
        if missing:
            raise ValueError(f"not a decoder graph with a KV cache: missing {', '.join(missing)}")
        self._has_position_ids = "position_ids" in inputs
        self.logits_dtype = _DTYPES[next(o.type for o in self._session.get_outputs() if o.name == "logits")]
        self.keeps_logits = KEEP_LOGITS_INPUT in inputs
        self.ids_dtype = _DTYPES[inputs["input_ids"].type]
        self.mask_dtype = _DTYPES[inputs["attention_mask"].type]
        past = sorted(
            (int(m[1]), m[2] == "value", name) for name in inputs if (m := _PAST_NAME.match(name)) is not None
        )
        self.past_names = [name for _, _, name in past]
        self.present_names = [name.replace("past_key_values.", "present.", 1) for name in self.past_names]
        if not self.past_names or any(name not in outputs for name in self.present_names):
            raise ValueError("graph has no KV cache (export with task text-generation-with-past)")
        kv_type = inputs[self.past_names[0]].type
        if kv_type not in ("tensor(float)", "tensor(float16)"):
            raise ValueError(f"unsupported KV-cache type {kv_type}")
        self.kv_dtype = _DTYPES[kv_type]

        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        self.kv_heads = int(config.get("num_key_value_heads") or heads)
        self.head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        self.vocab_size = int(config["vocab_size"])
        self.max_positions = int(config["max_position_embeddings"])
        if len(self.past_names) != 2 * layers:
            raise ValueError(f"graph has {len(self.past_names) // 2} KV layers, config.json says {layers}")
        graph_shape = inputs[self.past_names[0]].shape
        for axis, expected in ((1, self.kv_heads), (3, self.head_dim)):
            if isinstance(graph_shape[axis], int) and graph_shape[axis] != expected:
                raise ValueError(f"KV-cache shape {graph_shape} does not match config.json ({expected} at axis {axis})")

    @property
    def session(self) -> ort.InferenceSession:
        """The onnxruntime session (for IO binding by the KV-cache batches)."""
        return self._session

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A zero-length KV cache for ``batch`` rows, in the graph's order."""
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in self.past_names]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: Sequence[np.ndarray],
        *,
        keep_logits: int | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One pass over the new positions: (logits [batch, new or keep, vocab], present KV cache).

        ``attention_mask`` covers past and new positions; all arrays are int64.
        ``keep_logits`` asks for only the last positions' logits; graphs without the
        ``num_logits_to_keep`` input return every position's, so callers index from the end.
        Fused-attention graphs need every row's valid tokens first (right padding).
        """
        feed: dict[str, np.ndarray] = {
            "input_ids": input_ids.astype(self.ids_dtype, copy=False),
            "attention_mask": attention_mask.astype(self.mask_dtype, copy=False),
        }
        if self._has_position_ids:
            feed["position_ids"] = position_ids
        if self.keeps_logits:
            feed[KEEP_LOGITS_INPUT] = np.asarray(keep_logits or input_ids.shape[1], dtype=np.int64)
        feed.update(zip(self.past_names, past, strict=True))
        logits, *present = self._session.run(["logits", *self.present_names], feed)
        return logits, present
