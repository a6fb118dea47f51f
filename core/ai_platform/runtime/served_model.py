"""One loaded model as the engine serves it: chat messages in, completions and choices out.

:class:`InProcessModel` runs the model in the server's own process, its forward passes on
a thread of its own; :class:`~ai_platform.runtime.model_process.ModelProcess` runs the
same thing in a supervised child process (the default, ``MODEL_ISOLATION=process``), so
a native crash in onnxruntime costs that model's requests in flight, not the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ai_platform.operations import Choice, Completion, Message, TextDelta, TokenLogprob, TopLogprob
from ai_platform.runtime.engine_loop import EngineLoop
from ai_platform.runtime.generation import GREEDY, Generated, PickedLogprobs, Sampling
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

        With ``sampling.logprobs``, the deltas are :class:`~ai_platform.operations.TextDelta` s carrying
        their tokens' log-probabilities. Closing the iterator early cancels the generation (its row leaves
        the batch at the next step).
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
        picks: list[PickedLogprobs] = []
        generated = await self._engine_loop.generate(
            prompt, budget, model.eos_ids, **self._picking(sampling, stop, picks.append)
        )
        completion = self._completion(generated, stop)
        if sampling.logprobs is None:
            return completion
        kept = self._kept_before_stop(generated.tokens, stop)
        logprobs = [self._token_logprob(pick) for pick in picks[:kept]]
        return dataclasses.replace(completion, logprobs=logprobs)

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
        # With logprobs: picks[i] is the i-th token's (the sampler reports it before the token is handed over).
        picks: list[PickedLogprobs] = []
        generation = asyncio.ensure_future(
            self._engine_loop.generate(
                prompt, budget, model.eos_ids, tokens.put_nowait, **self._picking(sampling, stop, picks.append)
            )
        )
        # Each token is handed over before the result, so the queue holds them all when None arrives.
        generation.add_done_callback(lambda _: tokens.put_nowait(None))
        deltas = TextDeltas(model.tokenizer)
        shown = StopFilter(stop)
        with_logprobs = sampling.logprobs is not None
        # Tokens not sent yet, each with where its text begins; one is sent with the piece that shows
        # that place (so a token cut off by a stop string, which begins where the shown text ends, never is).
        waiting: list[tuple[int, TokenLogprob]] = []
        decoded = sent = 0  # characters of text decoded, and shown
        logprobs: list[TokenLogprob] = []
        try:
            count = 0
            while (token := await tokens.get()) is not None:
                delta = deltas.push(token)
                if with_logprobs:
                    waiting.append((decoded, self._token_logprob(picks[count])))
                    count += 1
                decoded += len(delta)
                if delta and (piece := shown.push(delta)):
                    if not with_logprobs:
                        yield piece
                        continue
                    sent += len(piece)
                    yield self._with_logprobs(piece, waiting, sent, logprobs)
            generated = generation.result()
        finally:
            generation.cancel()  # a no-op once it is done; else the sequence leaves the batch
        rest = shown.finish()
        if with_logprobs:
            sent += len(rest)
            if sent == decoded:  # no stop string: every token, those of an unfinished character too
                sent = decoded + 1
            if rest or (waiting and waiting[0][0] < sent):
                yield self._with_logprobs(rest, waiting, sent, logprobs)
        elif rest:
            yield rest
        completion = self._completion(generated, stop)
        yield dataclasses.replace(completion, logprobs=logprobs) if with_logprobs else completion

    @staticmethod
    def _with_logprobs(
        piece: str, waiting: list[tuple[int, TokenLogprob]], sent: int, logprobs: list[TokenLogprob]
    ) -> TextDelta:
        """``piece`` with the waiting tokens whose text begins before ``sent`` (taken from ``waiting``)."""
        ready = 0
        while ready < len(waiting) and waiting[ready][0] < sent:
            ready += 1
        taken = [entry for _, entry in waiting[:ready]]
        del waiting[:ready]
        logprobs.extend(taken)
        return TextDelta(piece, taken)

    def _picking(
        self, sampling: Sampling, stop: Sequence[str], report: Callable[[PickedLogprobs], None]
    ) -> dict[str, Any]:
        """How a generation picks its tokens and ends: its own sampler (reporting its picks' logprobs
        if ``sampling`` asks for them), and a watch for its stop strings."""
        watch = StopWatch(self.model.tokenizer, stop).push if any(stop) else None
        return {"sample": sampling.sampler(report), "ends": watch}

    def _token_logprob(self, pick: PickedLogprobs) -> TokenLogprob:
        piece = self.model.tokenizer.piece
        text, raw = piece(pick.token)
        top = []
        for token, logprob in pick.top:
            top_text, top_raw = piece(token)
            top.append(TopLogprob(token=top_text, logprob=logprob, bytes=list(top_raw)))
        return TokenLogprob(token=text, logprob=pick.logprob, bytes=list(raw), top_logprobs=top)

    def _kept_before_stop(self, tokens: Sequence[int], stop: Sequence[str]) -> int:
        """How many of ``tokens`` begin before the first stop string in their text (all without one).

        The text and the places are :class:`TextDeltas`' (as :class:`StopWatch` and a stream see them).
        """
        if not any(stop):
            return len(tokens)
        deltas = TextDeltas(self.model.tokenizer)
        starts, text = [], ""
        for token in tokens:
            starts.append(len(text))
            text += deltas.push(token)
        end = len(cut_at_stop(text, stop))
        return len(tokens) if end == len(text) else sum(1 for start in starts if start < end)

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
