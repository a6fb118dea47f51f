"""The engine contract: what the platform asks of whatever runs its models.

One statement of it, used by orchestration, metrics, ``/health`` and the test kit
(``ai_platform.testing.FakeEngine``); the runtime (``ai_platform.runtime.engine.InferenceEngine``)
implements it. Nothing here imports onnxruntime or numpy, so the API layer and plugin
tests can use it without loading the runtime.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

from ai_platform.errors import PlatformError
from ai_platform.operations import Choice, Choose, Completion, Generate, ModelCall

__all__ = ["Engine", "ModelStatus", "PromptTooLongError"]


@dataclass(frozen=True)
class ModelStatus:
    """Load state of one operation's model."""

    operation: str
    model: str  # folder name from the operation → model map
    path: str  # models_dir / folder as configured (not symlink-resolved)
    loaded: bool
    provider: str | None  # execution provider the session actually uses
    error: str | None  # why it is not loaded
    queue_depth: int = 0  # requests waiting or running on this model (shared by its operations)
    reused_prompt_tokens: int = 0  # prompt positions taken from the model's prefix cache instead of computed


class PromptTooLongError(PlatformError):
    """A prompt that leaves no room in the model's context window for the answer.

    Raised by the engine, which knows its tokenizer and context window but not the HTTP
    request; orchestration names the request field it came from, and the API layer renders
    the seed's 422 (``string_too_long``) from it.
    """

    status_code = 422

    def __init__(self, tokens: int, most: int, *, unit: str = "tokens") -> None:
        super().__init__(f"Input is too long for the model's context window ({tokens} {unit}; at most {max(most, 0)}).")
        self.tokens = tokens
        self.most = max(most, 0)
        self.unit = unit


class Engine(Protocol):
    """What the platform needs from the runtime.

    ``check`` is asked before a request is admitted to its limit, ``generate``/``stream``/``choose``
    after; all raise :class:`PromptTooLongError` for a prompt that does not fit and
    :class:`~ai_platform.errors.ModelUnavailableError` when the operation's model is not loaded.
    """

    async def start(self) -> None:
        """Load the models (a model that fails to load is reported by :meth:`status`, not raised)."""
        ...

    async def close(self) -> None:
        """Stop every model and give back its memory."""
        ...

    def status(self) -> Sequence[ModelStatus]:
        """Every operation's model, loaded or not (read by ``/health`` and ``/metrics``)."""
        ...

    def model_name(self, operation: str) -> str:
        """The name of the model serving ``operation`` (``meta.model_used``)."""
        ...

    async def check(self, operation: str, call: ModelCall) -> int | None:
        """The prompt's length in tokens (``None`` if the engine cannot count), without model work.

        Raises what ``generate``/``choose`` would raise for ``call``; for ``Choose`` the longest
        option must fit too. Must not wait for the model's queue, and may run concurrently.
        """
        ...

    async def generate(self, operation: str, call: Generate, *, max_output_tokens: int) -> Completion:
        """The completion of ``call.messages``, at most ``max_output_tokens`` long (the final cap)."""
        ...

    def stream(
        self, operation: str, call: Generate, *, max_output_tokens: int
    ) -> AsyncGenerator[str | Completion, None]:
        """:meth:`generate`, yielding text deltas as they are decoded, then the :class:`Completion`.

        Closing the iterator before its end cancels the generation.
        """
        ...

    async def choose(self, operation: str, call: Choose) -> Choice:
        """Probabilities of ``call.options`` as the model's complete answer to ``call.messages``."""
        ...
