"""A model in a child process of its own, supervised by the server process.

onnxruntime is native code: a segfault, heap corruption or abort in it ends the process it
runs in. So each model runs in a child process (``multiprocessing``'s spawn start method:
no threads, sockets or event loop inherited) that holds the model, its prefix cache and its
continuous batch — an :class:`~ai_platform.runtime.served_model.InProcessModel` — and talks
to the server over a pipe: chat messages (with sampling and stop strings) in, completions and
choices out (a few kB a call).

When the child dies, every call in flight on it fails with :class:`ModelUnavailableError`
(503 with ``Retry-After``; the orchestrator releases their reservations, so nothing is
counted), ``/health`` shows the model as not loaded with the reason, and a new child loads
the model again after a back-off: 1 s, doubling up to 30 s, back to 1 s once a child has
lived a minute. The child ends when the server closes the pipe or dies (it never outlives
the server), and ignores SIGINT/SIGTERM, which a terminal or systemd sends to the whole
process group: the server decides when its models stop, after its requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import itertools
import logging
import math
import multiprocessing
import signal
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from ai_platform.engine_contract import PromptTooLongError
from ai_platform.errors import ModelUnavailableError, OverloadedError, RequestValidationError, ServiceUnavailableError
from ai_platform.operations import Choice, Completion, Message
from ai_platform.runtime.generation import GREEDY, Sampling
from ai_platform.runtime.model import PromptEncoder
from ai_platform.runtime.served_model import InProcessModel, ModelOptions

logger = logging.getLogger(__name__)

FIRST_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
HEALTHY_AFTER = 60.0  # seconds a child must have lived for its death to restart the back-off
CLOSE_TIMEOUT = 10.0  # seconds a child gets to stop before it is killed


class ModelProcessError(RuntimeError):
    """A call failed inside the model process with an error that is not the client's."""


def describe_exit(exitcode: int | None) -> str:
    """How a process ended, in words: ``killed by SIGSEGV``, ``exited with code 1``."""
    if exitcode is None:
        return "stopped responding"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


# Errors cross the pipe as plain tuples: the platform's exceptions do not all pickle back
# into themselves (RequestValidationError's constructor takes its error list, not a message).
def _encode_error(error: Exception) -> tuple[Any, ...]:
    if isinstance(error, PromptTooLongError):
        return ("prompt_too_long", error.tokens, error.most, error.unit, error.operation, error.loc)
    if isinstance(error, RequestValidationError):
        return ("validation", error.errors)
    if isinstance(error, OverloadedError):
        return ("overloaded", error.detail, error.retry_after)
    if isinstance(error, ServiceUnavailableError):
        return ("unavailable", error.detail, error.retry_after)
    return ("internal", f"{type(error).__name__}: {error}")


def _decode_error(encoded: tuple[Any, ...]) -> Exception:
    kind = encoded[0]
    if kind == "prompt_too_long":
        return PromptTooLongError(encoded[1], encoded[2], unit=encoded[3], operation=encoded[4], loc=encoded[5])
    if kind == "validation":
        return RequestValidationError(encoded[1])
    if kind == "overloaded":
        return OverloadedError(encoded[1], retry_after=encoded[2])
    if kind == "unavailable":
        return ModelUnavailableError(encoded[1], retry_after=encoded[2])
    return ModelProcessError(encoded[1])


# --- the child side --------------------------------------------------------------------


def _child_main(conn: Connection, name: str, folder: str, options: ModelOptions) -> None:
    """Entry point of a model process: load the model, then serve calls until the pipe closes."""
    faulthandler.enable()  # a native crash leaves its Python stack on stderr (the service's journal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        model = InProcessModel.load(name, Path(folder), options)
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", model.provider))
    asyncio.run(_ChildServer(conn, model).serve())


class _ChildServer:
    """Runs the calls that arrive on the pipe concurrently (they batch together in the model)."""

    def __init__(self, conn: Connection, model: InProcessModel) -> None:
        self._conn = conn
        self._model = model
        self._tasks: dict[int, asyncio.Task[None]] = {}

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[None] = loop.create_future()
        threading.Thread(target=self._receive, args=(loop, stop), name="model-pipe", daemon=True).start()
        await stop
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await self._model.close()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _receive(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Future[None]) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):  # the server closed the pipe or died
                message = ("close",)
            loop.call_soon_threadsafe(self._dispatch, message, stop)
            if message[0] == "close":
                return

    def _dispatch(self, message: tuple[Any, ...], stop: asyncio.Future[None]) -> None:
        kind = message[0]
        if kind == "close":
            if not stop.done():
                stop.set_result(None)
        elif kind == "cancel":
            task = self._tasks.get(message[1])
            if task is not None:
                task.cancel()  # the engine loop drops the call, or its sequence leaves the batch at the next step
        elif kind == "queue_depth":
            self._send(("done", message[1], self._model.queue_depth, self._model.reused_prompt_tokens))
        else:
            _, call_id, payload = message
            self._tasks[call_id] = asyncio.ensure_future(self._run(call_id, kind, payload))

    async def _run(self, call_id: int, kind: str, payload: tuple[Any, ...]) -> None:
        reply: tuple[Any, ...]
        try:
            if kind == "generate":
                result: Completion | Choice = await self._model.generate(*payload)
            elif kind == "choose":
                result = await self._model.choose(*payload)
            elif kind == "stream":
                async for item in self._model.stream(*payload):
                    if isinstance(item, str):
                        self._send(("delta", call_id, item))
                    else:
                        result = item
            else:
                raise ValueError(f"unknown model call {kind!r}")
            reply = ("done", call_id, result, self._model.reused_prompt_tokens)
        except asyncio.CancelledError:
            reply = ("cancelled", call_id)
        except Exception as exc:
            reply = ("failed", call_id, _encode_error(exc))
        self._tasks.pop(call_id, None)
        self._send(reply)

    def _send(self, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError):  # the server is gone: _receive ends the process
            self._conn.send(message)


# --- the server side -------------------------------------------------------------------


class ModelProcess:
    """A model served from a supervised child process; restarted with back-off when it dies.

    Implements :class:`~ai_platform.runtime.served_model.ServedModel`; all methods run on
    the server's event loop.
    """

    def __init__(self, name: str, folder: Path, options: ModelOptions) -> None:
        self._name = name
        self._folder = folder
        self._options = options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Connection | None = None  # set while a child serves
        self._process: BaseProcess | None = None  # the current child, loading or serving
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._streams: dict[int, asyncio.Queue[Any]] = {}  # streaming calls: deltas, then the result or an error
        self._probes: dict[int, asyncio.Future[Any]] = {}  # child_queue_depth() calls (not counted in queue_depth)
        self._ids = itertools.count()
        self._provider: str | None = None
        self._encoder: PromptEncoder | None = None  # the text side, loaded here too
        self._error: str | None = "not loaded yet"
        self._reused_before = 0  # prefix-cache reuse counted by earlier children
        self._reused = 0
        self._failures = 0
        self._started_at = 0.0
        self._closing = False
        self._restarting: asyncio.Task[None] | None = None
        self.restarts = 0
        self.cancels_acknowledged = 0  # calls the child reported stopped after they were cancelled

    @property
    def loaded(self) -> bool:
        return self._conn is not None

    @property
    def error(self) -> str | None:
        return None if self.loaded else self._error

    @property
    def provider(self) -> str | None:
        return self._provider if self.loaded else None

    @property
    def encoder(self) -> PromptEncoder:
        assert self._encoder is not None, "start() loads it"
        return self._encoder

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + len(self._streams)

    @property
    def reused_prompt_tokens(self) -> int:
        return self._reused_before + self._reused

    @property
    def pid(self) -> int | None:
        """The current child's process id (None while none runs)."""
        return self._process.pid if self._process is not None else None

    async def child_queue_depth(self) -> int:
        """Calls waiting or running inside the child, as its scheduler counts them now.

        ``queue_depth`` is this side's count, which drops as soon as a caller gives up; this
        one drops once the child has dropped the call (a cancelled sequence left its batch).
        """
        depth: int = await self._call("queue_depth", (), self._probes)
        return depth

    async def start(self) -> None:
        """Start the child and wait until it has loaded the model; on failure, ``error`` says why."""
        self._loop = asyncio.get_running_loop()
        if await self._spawn():
            try:
                self._encoder = await asyncio.to_thread(PromptEncoder.from_folder, self._folder)
            except Exception as exc:  # the child read the same files: only a folder changed meanwhile
                await self.close()
                self._error = f"failed to load: {type(exc).__name__}: {exc}"

    async def _spawn(self) -> bool:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_child_main,
            args=(theirs, self._name, str(self._folder), self._options),
            name=f"ai-platform-model-{self._name}",
            daemon=True,
        )
        self._process = process
        await asyncio.to_thread(process.start)
        theirs.close()
        try:
            first = await asyncio.to_thread(ours.recv)
        except (EOFError, OSError):
            await asyncio.to_thread(process.join, CLOSE_TIMEOUT)
            first = ("failed", f"the model process {describe_exit(process.exitcode)} while loading")
        if first[0] != "ready" or self._closing:
            ours.close()
            await asyncio.to_thread(process.join, CLOSE_TIMEOUT)
            if process.is_alive():
                process.kill()
            self._process = None
            self._error = f"failed to load: {first[1]}" if first[0] != "ready" else "engine closed"
            return False
        self._conn, self._provider, self._error = ours, first[1], None
        self._started_at = time.monotonic()
        reader = threading.Thread(target=self._receive, args=(ours, process), name=f"model-{self._name}", daemon=True)
        reader.start()
        return True

    def _receive(self, conn: Connection, process: BaseProcess) -> None:
        """The pipe's reader thread: hands replies to the event loop, then reports the child's end."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            self._call_soon(self._on_reply, message)
        process.join(CLOSE_TIMEOUT)
        conn.close()
        self._call_soon(self._on_exit, conn, process.exitcode)

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(callback, *args)

    def _on_reply(self, message: tuple[Any, ...]) -> None:
        kind, call_id = message[0], message[1]
        if kind == "cancelled":
            self.cancels_acknowledged += 1
        if call_id in self._streams:
            if kind == "delta":
                self._streams[call_id].put_nowait(message[2])
                return
            stream = self._streams.pop(call_id)
            if kind == "done":
                self._reused = message[3]
                stream.put_nowait(message[2])
            else:
                stream.put_nowait(_decode_error(message[2]) if kind == "failed" else self._dropped())
            return
        future = self._pending.pop(call_id, None) or self._probes.pop(call_id, None)
        if future is None or future.done():  # the caller cancelled meanwhile
            return
        if kind == "done":
            self._reused = message[3]
            future.set_result(message[2])
        elif kind == "failed":
            future.set_exception(_decode_error(message[2]))
        else:
            future.set_exception(self._dropped())

    def _dropped(self) -> ModelUnavailableError:
        return ModelUnavailableError(f"Model '{self._name}' dropped the call.")

    def _on_exit(self, conn: Connection, exitcode: int | None) -> None:
        if conn is not self._conn:  # closed on purpose
            return
        self._conn = self._process = None
        self._reused_before += self._reused
        self._reused = 0
        how = describe_exit(exitcode)
        lived = time.monotonic() - self._started_at
        if lived >= HEALTHY_AFTER:
            self._failures = 0
        delay = min(MAX_RESTART_DELAY, FIRST_RESTART_DELAY * 2**self._failures)
        self._failures += 1
        self._error = f"the model process {how}; restarting"
        logger.error(
            "model %s: its process %s after %.0f s with %d calls in flight; restarting in %g s",
            self._name, how, lived, len(self._pending), delay,
        )  # fmt: skip
        self._fail_pending(
            ModelUnavailableError(
                f"Model '{self._name}' stopped unexpectedly and is restarting; retry shortly.",
                retry_after=math.ceil(delay) + 1,
            )
        )
        assert self._loop is not None
        self._restarting = self._loop.create_task(self._restart(delay))

    async def _restart(self, delay: float) -> None:
        while not self._closing:
            await asyncio.sleep(delay)
            if self._closing:
                return
            started = time.perf_counter()
            if await self._spawn():
                self.restarts += 1
                logger.warning("model %s: restarted in %.1f s", self._name, time.perf_counter() - started)
                return
            delay = min(MAX_RESTART_DELAY, delay * 2)
            logger.error("model %s: restart failed (%s); next try in %g s", self._name, self._error, delay)
            self._error = f"restart failed ({self._error}); retrying"

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = {**self._pending, **self._probes}, {}
        self._probes = {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put_nowait(error)

    def _submit(
        self, kind: str, payload: tuple[Any, ...], waiting: dict[int, Any], waiter: Any
    ) -> tuple[int, Connection]:
        """Send a call to the child; ``waiter`` (kept in ``waiting``) receives its outcome."""
        conn = self._conn
        if conn is None:
            raise ModelUnavailableError(f"Model '{self._name}' is not available; retry later.", retry_after=5)
        call_id = next(self._ids)
        waiting[call_id] = waiter
        try:
            conn.send((kind, call_id, payload))
        except OSError:  # the child just died; its reader thread reports it
            waiting.pop(call_id, None)
            raise ModelUnavailableError(
                f"Model '{self._name}' stopped unexpectedly; retry shortly.", retry_after=5
            ) from None
        return call_id, conn

    def _cancel(self, call_id: int, conn: Connection, waiting: dict[int, Any]) -> None:
        """The caller gave up on a call: the child drops it (or its sequence leaves the batch)."""
        if waiting.pop(call_id, None) is not None and self._conn is conn:
            with contextlib.suppress(OSError):
                conn.send(("cancel", call_id))

    async def _call(self, kind: str, payload: tuple[Any, ...], waiting: dict[int, Any] | None = None) -> Any:
        assert self._loop is not None
        waiting = self._pending if waiting is None else waiting
        future = self._loop.create_future()
        call_id, conn = self._submit(kind, payload, waiting, future)
        try:
            return await future
        except asyncio.CancelledError:
            self._cancel(call_id, conn, waiting)
            raise

    async def stream(
        self,
        messages: Sequence[Message],
        max_output_tokens: int,
        sampling: Sampling = GREEDY,
        stop: Sequence[str] = (),
    ) -> AsyncGenerator[str | Completion, None]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        payload = (list(messages), max_output_tokens, sampling, list(stop))
        call_id, conn = self._submit("stream", payload, self._streams, queue)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if not isinstance(item, str):
                    return
        finally:
            self._cancel(call_id, conn, self._streams)  # a no-op once the result is in

    async def generate(
        self,
        messages: Sequence[Message],
        max_output_tokens: int,
        sampling: Sampling = GREEDY,
        stop: Sequence[str] = (),
    ) -> Completion:
        result: Completion = await self._call("generate", (list(messages), max_output_tokens, sampling, list(stop)))
        return result

    async def choose(
        self, messages: Sequence[Message], options: Sequence[str], neutral: Sequence[Message] = ()
    ) -> Choice:
        result: Choice = await self._call("choose", (list(messages), list(options), list(neutral)))
        return result

    async def close(self) -> None:
        self._closing = True
        if self._restarting is not None:
            self._restarting.cancel()
        self._fail_pending(ModelUnavailableError(f"Model '{self._name}' is shutting down."))
        conn, process = self._conn, self._process
        self._conn, self._process, self._error = None, None, "engine closed"
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(("close",))
        if process is not None:
            await asyncio.to_thread(process.join, CLOSE_TIMEOUT)
            if process.is_alive():
                logger.error("model %s: its process did not stop in %g s; killing it", self._name, CLOSE_TIMEOUT)
                process.kill()
                await asyncio.to_thread(process.join)
