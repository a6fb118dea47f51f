"""One loaded model as the engine serves it: chat messages in, completions and choices out.

:class:`InProcessModel` runs the model in the server's own process, its forward passes on
a thread of its own; :class:`~ai_platform.runtime.model_process.ModelProcess` runs the
same thing in a supervised child process (the default, ``MODEL_ISOLATION=process``), so
a native crash in onnxruntime costs that model's requests in flight, not the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ai_platform.operations import Choice, Completion, Message
from ai_platform.runtime.engine_loop import EngineLoop
from ai_platform.runtime.generation import GREEDY, Generated, Sampling
from ai_platform.runtime.kv_batch import new_batch
from ai_platform.runtime.model import LanguageModel, PromptEncoder
from ai_platform.runtime.model_runner import ModelRunner
from ai_platform.runtime.prefix_cache import DEFAULT_MAX_BYTES
from ai_platform.runtime.scheduler import Scheduler
from ai_platform.runtime.stop_strings import StopFilter, StopWatch, cut_at_stop
from ai_platform.runtime.tokenizer import TextDeltas
from ai_platform.settings import ExecutionProvider

DEFAULT_KV_CACHE_BYTES = 4096 * 2**20


@dataclass(frozen=True)
class ModelOptions:
    """How a model folder is loaded and scheduled (the same for every model of an engine)."""

    execution_provider: ExecutionProvider = "auto"
    intra_op_threads: int | None = None
    prefix_cache_bytes: int = DEFAULT_MAX_BYTES
    max_queue: int = 32
    max_batch: int = 16
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES  # the decode batch's KV cache, at most (see Scheduler.can_admit)


class ServedModel(Protocol):
    """What the engine needs from a loaded model, wherever it runs."""

    @property
    def loaded(self) -> bool:
        """True while calls can be served (false while a crashed model process restarts)."""
        ...

    @property
    def error(self) -> str | None:
        """Why it is not loaded now."""
        ...

    @property
    def provider(self) -> str | None: ...

    @property
    def encoder(self) -> PromptEncoder:
        """The model's text side, in the server's process: prompts are checked with it before admission."""
        ...

    @property
    def queue_depth(self) -> int:
        """Calls waiting or running on this model."""
        ...

    @property
    def reused_prompt_tokens(self) -> int:
        """Prompt positions taken from the prefix cache instead of computed."""
        ...

    async def generate(
        self,
        messages: Sequence[Message],
        max_output_tokens: int,
        sampling: Sampling = GREEDY,
        stop: Sequence[str] = (),
    ) -> Completion:
        """Completion of ``messages`` with at most ``max_output_tokens`` new tokens.

        Tokens are picked as ``sampling`` says (greedy by default); the text ends before the
        first of the ``stop`` strings that appears (``finish_reason`` "stop").
        """
        ...

    def stream(
        self,
        messages: Sequence[Message],
        max_output_tokens: int,
        sampling: Sampling = GREEDY,
        stop: Sequence[str] = (),
    ) -> AsyncGenerator[str | Completion, None]:
        """:meth:`generate`, yielding the text as it is decoded (``str`` deltas), then the :class:`Completion`.

        Closing the iterator early cancels the generation (its row leaves the batch at the next step).
        """
        ...

    async def choose(
        self, messages: Sequence[Message], options: Sequence[str], neutral: Sequence[Message] = ()
    ) -> Choice:
        """Probabilities of ``options`` (distinct) as the model's complete answer to ``messages``.

        With ``neutral`` messages, calibrated against them (:class:`~ai_platform.operations.Choose`).
        """
        ...

    async def close(self) -> None:
        """Fail waiting calls, stop running ones and release the model."""
        ...


class InProcessModel:
    """A model in this process: tokenisation on worker threads, model work on its engine loop's thread."""

    def __init__(self, name: str, model: LanguageModel, options: ModelOptions) -> None:
        self.model = model
        kv = new_batch(model.decoder, model.prefix_cache, max_rows=options.max_batch, max_bytes=options.kv_cache_bytes)
        scheduler = Scheduler(ModelRunner(kv), options.max_batch, options.kv_cache_bytes)
        self._engine_loop = EngineLoop(name, options.max_queue, scheduler)

    @classmethod
    def load(cls, name: str, folder: Path, options: ModelOptions) -> InProcessModel:
        """Load ``folder`` (blocking; raises what :meth:`LanguageModel.load` raises)."""
        model = LanguageModel.load(
            folder,
            execution_provider=options.execution_provider,
            intra_op_threads=options.intra_op_threads,
            prefix_cache_bytes=options.prefix_cache_bytes,
        )
        return cls(name, model, options)

    @property
    def loaded(self) -> bool:
        return True

    @property
    def error(self) -> str | None:
        return None

    @property
    def provider(self) -> str | None:
        return self.model.provider

    @property
    def encoder(self) -> PromptEncoder:
        return self.model

    @property
    def queue_depth(self) -> int:
        return self._engine_loop.queue_depth

    @property
    def reused_prompt_tokens(self) -> int:
        return self.model.prefix_cache.reused_tokens

    async def generate(
        self,
        messages: Sequence[Message],
        max_output_tokens: int,
        sampling: Sampling = GREEDY,
        stop: Sequence[str] = (),
    ) -> Completion:
        model = self.model
        prompt = await asyncio.to_thread(model.encode_prompt, messages)
        budget = model.budget(prompt, max_output_tokens)
        generated = await self._engine_loop.generate(prompt, budget, model.eos_ids, **self._picking(sampling, stop))
        return self._completion(generated, stop)

    async def stream(
        self,
        messages: Sequence[Message],
        max_output_tokens: int,
        sampling: Sampling = GREEDY,
        stop: Sequence[str] = (),
    ) -> AsyncGenerator[str | Completion, None]:
        model = self.model
        prompt = await asyncio.to_thread(model.encode_prompt, messages)
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        budget = model.budget(prompt, max_output_tokens)
        generation = asyncio.ensure_future(
            self._engine_loop.generate(
                prompt, budget, model.eos_ids, tokens.put_nowait, **self._picking(sampling, stop)
            )
        )
        # Each token is handed over before the result, so the queue holds them all when None arrives.
        generation.add_done_callback(lambda _: tokens.put_nowait(None))
        deltas = TextDeltas(model.tokenizer)
        shown = StopFilter(stop)
        try:
            while (token := await tokens.get()) is not None:
                if (delta := deltas.push(token)) and (piece := shown.push(delta)):
                    yield piece
            generated = generation.result()
        finally:
            generation.cancel()  # a no-op once it is done; else the sequence leaves the batch
        if rest := shown.finish():
            yield rest
        yield self._completion(generated, stop)

    def _picking(self, sampling: Sampling, stop: Sequence[str]) -> dict[str, Any]:
        """How a generation picks its tokens and ends: its own sampler, and a watch for its stop strings."""
        watch = StopWatch(self.model.tokenizer, stop).push if any(stop) else None
        return {"sample": sampling.sampler(), "ends": watch}

    def _completion(self, generated: Generated, stop: Sequence[str]) -> Completion:
        completion = self.model.completion(generated)
        if not any(stop):
            return completion
        # Cut the text as StopWatch saw it (leading whitespace dropped), then strip it as completion() does.
        text = cut_at_stop(self.model.tokenizer.decode(generated.tokens).lstrip(), stop).strip()
        return Completion(text=text, output_tokens=completion.output_tokens, finish_reason=completion.finish_reason)

    async def choose(
        self, messages: Sequence[Message], options: Sequence[str], neutral: Sequence[Message] = ()
    ) -> Choice:
        model = self.model
        prompt, answers = await asyncio.to_thread(model.encode_choice, messages, options)
        baseline = await asyncio.to_thread(model.encode_choice, neutral, options) if neutral else None
        return await self._engine_loop.run(model.choose_steps(prompt, answers, options, baseline))

    async def close(self) -> None:
        await self._engine_loop.close()
