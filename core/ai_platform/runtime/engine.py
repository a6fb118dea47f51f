"""The runtime's public face: loads the operations' models and runs model calls off the event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ai_platform.engine_contract import ModelStatus
from ai_platform.errors import ConfigurationError, ModelUnavailableError
from ai_platform.operations import Choice, Choose, Completion, Generate
from ai_platform.runtime.generation import Sampling
from ai_platform.runtime.model_process import ModelProcess
from ai_platform.runtime.prefix_cache import DEFAULT_MAX_BYTES
from ai_platform.runtime.served_model import DEFAULT_KV_CACHE_BYTES, InProcessModel, ModelOptions, ServedModel
from ai_platform.settings import EXECUTION_PROVIDERS, ExecutionProvider, Settings

MODEL_ISOLATIONS = ("process", "thread")

logger = logging.getLogger(__name__)


@dataclass
class _Slot:
    """One distinct model (by real path), shared by every operation that maps to it."""

    model: ServedModel | None = None
    error: str | None = "not loaded yet"


class InferenceEngine:
    """Serves :class:`Generate` and :class:`Choose` calls on each operation's local ONNX model.

    Every distinct model folder is loaded once; concurrent generations on it share decode
    steps (up to ``max_batch`` sequences). With ``isolation="process"`` (the default) each
    model runs in a supervised child process that is restarted if it crashes; with
    ``"thread"`` it runs on a thread of this process (tests that patch the runtime, and
    benchmarks of the process boundary's cost). A model that fails to load is reported by
    :meth:`status` and makes its operations raise :class:`ModelUnavailableError`, while
    others keep working.
    """

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        operation_models: Mapping[str, str],
        *,
        models_dir: Path | None = None,
        isolation: str | None = None,
    ) -> InferenceEngine:
        """The engine ``ai-platform serve`` runs (also ``selftest`` and ``eval``), for ``operation_models``."""
        return cls(
            settings.models_dir if models_dir is None else models_dir,
            operation_models,
            execution_provider=settings.execution_provider,
            max_queue=settings.max_queue_per_model,
            max_batch=settings.max_batch_per_model,
            prefix_cache_bytes=settings.prefix_cache_mb * 2**20,
            kv_cache_bytes=settings.kv_cache_mb * 2**20,
            isolation=settings.model_isolation if isolation is None else isolation,
        )

    def __init__(
        self,
        models_dir: Path,
        operation_models: Mapping[str, str],
        *,
        execution_provider: ExecutionProvider = "auto",
        max_queue: int = 32,
        intra_op_threads: int | None = None,
        max_batch: int = 16,
        prefix_cache_bytes: int = DEFAULT_MAX_BYTES,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        isolation: str = "process",
    ) -> None:
        # Settings checks EXECUTION_PROVIDER as it reads it; this is for callers that build an engine themselves.
        if execution_provider not in EXECUTION_PROVIDERS:
            choices = ", ".join(EXECUTION_PROVIDERS)
            raise ConfigurationError(f"execution provider must be one of {choices}, not {execution_provider!r}")
        if max_queue < 1:
            raise ConfigurationError(f"max_queue must be at least 1, not {max_queue}")
        if max_batch < 1:
            raise ConfigurationError(f"max_batch must be at least 1, not {max_batch}")
        if kv_cache_bytes < 1:
            raise ConfigurationError(f"kv_cache_bytes must be at least 1, not {kv_cache_bytes}")
        if intra_op_threads is not None and intra_op_threads < 1:
            raise ConfigurationError(f"intra_op_threads must be at least 1, not {intra_op_threads}")
        if isolation not in MODEL_ISOLATIONS:
            raise ConfigurationError(f"isolation must be one of {', '.join(MODEL_ISOLATIONS)}, not {isolation!r}")
        self._models_dir = models_dir
        self._operation_models = dict(operation_models)
        self._options = ModelOptions(
            execution_provider, intra_op_threads, prefix_cache_bytes, max_queue, max_batch, kv_cache_bytes
        )
        self._isolation = isolation
        self._slots = {operation: _Slot() for operation in self._operation_models}
        self._started = False

    async def start(self) -> None:
        """Load every distinct model once; failures are recorded, not raised."""
        if self._started:
            raise RuntimeError("InferenceEngine.start() was already called")
        self._started = True
        by_real_path: dict[Path, _Slot] = {}
        for operation, folder in self._operation_models.items():
            path = self._models_dir / folder
            # Symlinked folders resolve to the same model and share one session.
            real_path = path.resolve()
            if real_path not in by_real_path:
                by_real_path[real_path] = await self._load(folder, path)
            self._slots[operation] = by_real_path[real_path]

    async def _load(self, folder: str, path: Path) -> _Slot:
        started = time.perf_counter()
        model: ServedModel | None = None
        if not path.is_dir():
            error: str | None = "model folder not found"
        elif self._isolation == "process":
            process = ModelProcess(folder, path, self._options)
            await process.start()
            model, error = (process, None) if process.loaded else (None, process.error)
        else:
            try:
                model = await asyncio.to_thread(InProcessModel.load, folder, path, self._options)
                error = None
            except Exception as exc:
                error = f"failed to load: {type(exc).__name__}: {exc}"
        if model is None:
            logger.error("model %s at %s is not available: %s", folder, path, error)
            return _Slot(error=error)
        seconds = time.perf_counter() - started
        where = "its own process" if self._isolation == "process" else "this process"
        logger.info("loaded model %s from %s on %s in %.1f s, in %s", folder, path, model.provider, seconds, where)
        return _Slot(model=model, error=None)

    async def close(self) -> None:
        """Stop the models (waiting calls fail, running ones stop) and release them."""
        models = {id(slot.model): slot.model for slot in self._slots.values() if slot.model is not None}
        self._slots = {operation: _Slot(error="engine closed") for operation in self._slots}
        for model in models.values():
            await model.close()

    def status(self) -> list[ModelStatus]:
        """One entry per operation in the map."""
        statuses = []
        for operation, folder in self._operation_models.items():
            slot = self._slots[operation]
            model = slot.model
            statuses.append(
                ModelStatus(
                    operation=operation,
                    model=folder,
                    path=str(self._models_dir / folder),
                    loaded=model is not None and model.loaded,
                    provider=model.provider if model is not None else None,
                    error=model.error if model is not None else slot.error,
                    queue_depth=model.queue_depth if model is not None else 0,
                    reused_prompt_tokens=model.reused_prompt_tokens if model is not None else 0,
                )
            )
        return statuses

    def model_name(self, operation: str) -> str:
        """The model folder name serving ``operation`` (``KeyError`` if it has none)."""
        return self._operation_models[operation]

    def _loaded(self, operation: str) -> ServedModel:
        slot = self._slots.get(operation)
        if slot is None:
            raise ModelUnavailableError(f"No model is configured for operation '{operation}'.")
        if slot.model is None:
            model = self._operation_models[operation]
            # Why it is not loaded (a path, onnxruntime's provider list, ...) is for admins: /health with an admin key.
            raise ModelUnavailableError(f"Model '{model}' for operation '{operation}' is not available; retry later.")
        return slot.model

    async def check(self, operation: str, call: Generate | Choose) -> int:
        """The prompt's length in tokens, without running the model (the tokenizer runs in this process).

        Raises :class:`PromptTooLongError` when it leaves no room in the model's context
        to answer, and :class:`ModelUnavailableError` when the operation's model is not loaded,
        so that both are known before a request is admitted and counted.
        """
        encoder = self._loaded(operation).encoder
        if isinstance(call, Generate):
            prompt = await asyncio.to_thread(encoder.encode_prompt, call.messages)
        else:
            options = list(dict.fromkeys(call.options))
            if not options:
                raise ValueError("Choose needs at least one option")
            prompt, _ = await asyncio.to_thread(encoder.encode_choice, call.messages, options)
        return len(prompt)

    async def generate(self, operation: str, call: Generate, *, max_output_tokens: int) -> Completion:
        """Completion of ``call.messages`` (greedy unless sampled), at most ``max_output_tokens`` long (the final cap)."""
        model = self._loaded(operation)
        return await model.generate(call.messages, max_output_tokens, _sampling(call), list(call.stop))

    def stream(
        self, operation: str, call: Generate, *, max_output_tokens: int
    ) -> AsyncGenerator[str | Completion, None]:
        """:meth:`generate`, yielding text deltas as they are decoded, then the :class:`Completion`.

        Closing the iterator before its end cancels the generation.
        """
        model = self._loaded(operation)
        return model.stream(call.messages, max_output_tokens, _sampling(call), list(call.stop))

    async def choose(self, operation: str, call: Choose) -> Choice:
        """Probabilities of ``call.options`` as the model's complete answer to ``call.messages``."""
        model = self._loaded(operation)
        options = list(dict.fromkeys(call.options))  # duplicates would collapse in the scores dict
        if not options:
            raise ValueError("Choose needs at least one option")
        return await model.choose(call.messages, options, call.neutral)


def _sampling(call: Generate) -> Sampling:
    """How ``call`` picks its tokens (greedy when its temperature is 0 or not given), and the logprobs it reports."""
    return Sampling(
        temperature=call.temperature or 0.0,
        top_p=1.0 if call.top_p is None else call.top_p,
        seed=call.seed,
        logprobs=call.logprobs,
    )
