"""AI Platform: task operations as plugins over local ONNX language models.

Plugin authors need what this module exports (plus ``ai_platform.testing``
for tests and ``ai_platform.languages`` for language names in prompts).
"""

from ai_platform.hookspecs import hookimpl
from ai_platform.operations import (
    Choice,
    Choose,
    Completion,
    Generate,
    LanguageCode,
    Limits,
    Message,
    Operation,
    RequestId,
    ResponseMeta,
)

__version__ = "0.1.0"

__all__ = [
    "Choice",
    "Choose",
    "Completion",
    "Generate",
    "LanguageCode",
    "Limits",
    "Message",
    "Operation",
    "RequestId",
    "ResponseMeta",
    "__version__",
    "hookimpl",
]
