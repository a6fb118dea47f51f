"""Model runtime: ONNX decoder models on onnxruntime (CPU or CUDA), no torch.

The orchestration layer talks only to :class:`InferenceEngine`; everything
below it (sessions, tokenizer, chat template, generation loop) is private to
this package.
"""

from ai_platform.engine_contract import ModelStatus
from ai_platform.runtime.engine import InferenceEngine

__all__ = ["InferenceEngine", "ModelStatus"]
