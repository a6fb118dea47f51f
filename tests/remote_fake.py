"""A controllable OpenAI-compatible engine on 127.0.0.1 for the remote engine's tests: a real HTTP/1.1 server
(asyncio streams, on a thread of its own) that can be down, slow, die mid-stream or answer garbage or errors.

Each ``POST /v1/chat/completions`` takes the next :class:`Reply` from ``replies`` (``default`` when empty);
``GET /v1/models`` lists ``model``. ``requests`` records every request, ``cancelled`` counts answers whose
client hung up before they were complete.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode


@dataclass
class Reply:
    status: int = 200
    chunks: Sequence[str] = ("Bonjour", " tout le", " monde.")  # streamed deltas
    usage: int | None = 3  # completion_tokens (None: no usage sent)
    finish_reason: str = "stop"
    raw: bytes | None = None  # the whole body instead (garbage, an error)
    delay: float = 0.0  # seconds before the head (watching for the client hanging up)
    drop_after: int | None = None  # cut the connection after this many chunks
    answer: str = "technical_support"  # a non-streamed answer's content
    top_logprobs: Sequence[tuple[str, float]] = ()  # a non-streamed answer's first-token candidates
    chunk_logprobs: Sequence[Sequence[dict[str, Any]]] = ()  # a streamed chunk's logprobs.content, per chunk
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None


class FakeOpenAIServer:
    def __init__(self, model: str = "fake-7b") -> None:
        self.model = model
        self.replies: collections.deque[Reply] = collections.deque()
        self.default = Reply()
        self.requests: list[Seen] = []
        self.cancelled = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = self._call(self._listen(0))

    # -- control, from the test's thread -----------------------------------------------------------

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    def start(self) -> None:
        """Listen again (on the same port) after :meth:`stop`."""
        self._call(self._listen(self.port))

    def stop(self) -> None:
        """Stop listening and cut every open connection: the engine is down."""
        self._call(self._stop())

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def url(self, model: str | None = None, **options: object) -> str:
        query = f"?{urlencode(options)}" if options else ""
        return f"openai+http://127.0.0.1:{self.port}/v1{query}#{model or self.model}"

    def chat_requests(self) -> list[Seen]:
        return [seen for seen in self.requests if seen.path.endswith("/chat/completions")]

    # -- the server, on its own loop -------------------------------------------------------------

    async def _listen(self, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        return int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines if ":" in ln)}
                size = int(headers.get("content-length", "0"))
                raw = await reader.readexactly(size) if size else b""
                body = json.loads(raw) if raw else None
                self.requests.append(Seen(method, path, headers, body))
                if method == "GET" and path.endswith("/models"):
                    listing = {"object": "list", "data": [{"id": self.model, "object": "model"}]}
                    await self._send(writer, 200, json.dumps(listing).encode())
                    continue
                reply = self.replies.popleft() if self.replies else self.default
                if not await self._wait(reader, reply.delay):
                    return
                if not await self._answer(writer, reply, body or {}):
                    return
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _wait(self, reader: asyncio.StreamReader, seconds: float) -> bool:
        """Wait ``seconds``, watching the connection: False (and counted) if the client hung up meanwhile."""
        if seconds <= 0:
            return True
        try:
            data = await asyncio.wait_for(reader.read(1), seconds)
        except TimeoutError:
            return True
        if not data:
            self.cancelled += 1
            return False
        return True

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes, **headers: str) -> None:
        head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Content-Type: application/json"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()

    async def _answer(self, writer: asyncio.StreamWriter, reply: Reply, body: dict[str, Any]) -> bool:
        if reply.raw is not None or reply.status != 200:
            await self._send(writer, reply.status, reply.raw or b"{}", **reply.headers)
            return True
        usage = None if reply.usage is None else {"prompt_tokens": 7, "completion_tokens": reply.usage}
        if not body.get("stream"):
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": reply.answer},
                "finish_reason": reply.finish_reason,
            }
            if body.get("logprobs") and reply.top_logprobs:
                (token, logprob), *_ = reply.top_logprobs
                candidates = [{"token": t, "logprob": lp} for t, lp in reply.top_logprobs]
                choice["logprobs"] = {"content": [{"token": token, "logprob": logprob, "top_logprobs": candidates}]}
            answer: dict[str, Any] = {"object": "chat.completion", "model": self.model, "choices": [choice]}
            if usage is not None:
                answer["usage"] = usage
            await self._send(writer, 200, json.dumps(answer).encode())
            return True
        head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head.encode())
        events: list[dict[str, Any] | str] = [
            {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]} for text in reply.chunks
        ]
        if body.get("logprobs"):
            for event, content in zip(events, reply.chunk_logprobs, strict=False):
                event["choices"][0]["logprobs"] = {"content": list(content)}  # type: ignore[index]
        events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}]})
        if usage is not None:
            events.append({"choices": [], "usage": usage})
        events.append("[DONE]")
        for number, event in enumerate(events):
            if reply.drop_after is not None and number == reply.drop_after:
                await writer.drain()
                writer.transport.abort()  # mid-stream: no terminating chunk
                return False
            data = event if isinstance(event, str) else json.dumps(event)
            chunk = f"data: {data}\n\n".encode()
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True
