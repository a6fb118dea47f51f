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

from ai_platform.errors import RequestValidationError
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


class PromptTooLongError(RequestValidationError):
    """A prompt too long to run: it leaves no room in the model's context window for the answer,
    or (``operation`` given) it is over that operation's ``Limits.max_input_tokens``.

    The engine raises it knowing its tokenizer and context window but not the HTTP request
    (``loc`` is then just ``["body"]``); orchestration names the request field the input came
    from (:meth:`at`), and the API layer renders it as the seed's 422 like every
    :class:`~ai_platform.errors.RequestValidationError` (one ``string_too_long`` entry), or as
    OpenAI's ``context_length_exceeded`` on ``/v1``.
    """

    def __init__(
        self,
        tokens: int,
        most: int,
        *,
        unit: str = "tokens",
        operation: str | None = None,
        loc: Sequence[str] = ("body",),
    ) -> None:
        self.tokens = tokens
        self.most = max(most, 0)
        self.unit = unit
        self.operation = operation
        self.loc = list(loc)
        if operation is None:
            message = f"Input is too long for the model's context window ({tokens} {unit}; at most {self.most})."
        else:
            message = (
                f"Input is too long for operation '{operation}': its prompt is {tokens} {unit}; at most {self.most}."
            )
        super().__init__([{"type": "string_too_long", "loc": self.loc, "msg": message, "input": None}])
        self.message = message
        self.args = (message,)  # what logs and tracebacks show, rather than "Request validation failed."

    def at(self, loc: Sequence[str]) -> PromptTooLongError:
        """The same error, found in the request field ``loc`` (``["body", "text"]``)."""
        return PromptTooLongError(self.tokens, self.most, unit=self.unit, operation=self.operation, loc=loc)


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
        option must fit too. Orchestration checks the count against ``Limits.max_input_tokens``.
        Must not wait for the model's queue (tokenizing is enough), and may run concurrently.
        """
        ...

    async def generate(self, operation: str, call: Generate, *, max_output_tokens: int) -> Completion:
        """The completion of ``call.messages``, at most ``max_output_tokens`` tokens long.

        ``max_output_tokens`` is the final cap: orchestration has already lowered the operation's
        limit to ``call.max_output_tokens``, so the engine does not apply that again.
        """
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
