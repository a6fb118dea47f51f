"""AI Platform: task operations as plugins over local ONNX language models.

Plugin authors need what this module exports (plus ``ai_platform.testing``
for tests and ``ai_platform.languages`` for language names in prompts).
"""

import os

# Air gap: onnxruntime (1.29+ on Linux) sends 1DS telemetry to Microsoft: about 10 s after it loads, it
# resolves mobile.events.data.microsoft.com and writes ~/.cache/Microsoft/DeveloperTools/.onnxruntime/.
# Only this variable, set before onnxruntime initialises, stops that (onnxruntime.disable_telemetry_events()
# and ORT_TELEMETRY_DISABLED do not). This package's __init__ runs before any of its modules, so before
# any of them imports onnxruntime, in every process the project starts: the server, uvicorn's workers, the
# CLI, the export tools and the test kit; the model processes and onnxruntime-genai's builder inherit it.
# An explicit value in the environment wins. Checked from outside by tests/reliability/test_air_gapped.py.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from ai_platform.errors import RequestValidationError
from ai_platform.hookspecs import hookimpl
from ai_platform.operations import (
    Choice,
    Choose,
    Completion,
    Example,
    Generate,
    LanguageCode,
    Limits,
    Message,
    Operation,
    RequestId,
    ResponseMeta,
    TextDelta,
    TokenLogprob,
    TopLogprob,
    examples_file,
)
from ai_platform.text import split_sentences

__version__ = "0.1.0"

__all__ = [
    "Choice",
    "Choose",
    "Completion",
    "Example",
    "Generate",
    "LanguageCode",
    "Limits",
    "Message",
    "Operation",
    "RequestId",
    "RequestValidationError",
    "ResponseMeta",
    "TextDelta",
    "TokenLogprob",
    "TopLogprob",
    "__version__",
    "examples_file",
    "hookimpl",
    "split_sentences",
]
