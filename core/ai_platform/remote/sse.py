"""Reading Server-Sent Events: the ``data`` of each event of an engine's streamed answer."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator


async def data_events(lines: AsyncIterable[str]) -> AsyncIterator[str]:
    """The ``data`` of each event in ``lines`` (an event's ``data:`` lines joined by newlines); other fields and
    comments are skipped, as the SSE specification says."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
        # "event:", "id:", "retry:" and ":" comments carry nothing an answer needs.
    if data:  # a last event without its blank line
        yield "\n".join(data)
