"""Stop strings: a generation ends where one appears in its text, which the answer then leaves out.

Tokens and text do not line up (a stop string may span tokens, a token may hold a stop string
and more), so both sides work on the decoded text: :class:`StopWatch` ends the sequence, on the
model's thread, once its text holds a stop string; :func:`cut_at_stop` cuts the final text there;
:class:`StopFilter` holds back, from a stream's deltas, any text that may be the start of a stop
string, so that a client never sees a stop string or what follows it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ai_platform.runtime.tokenizer import ChatTokenizer, TextDeltas


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first stop string in it (all of it if none occurs)."""
    found = [index for stop in stops if stop and (index := text.find(stop)) >= 0]
    return text[: min(found)] if found else text


class StopWatch:
    """Tells, token by token, when a generation's text (as :class:`TextDeltas` decodes it) holds a stop string."""

    def __init__(self, tokenizer: ChatTokenizer, stops: Sequence[str]) -> None:
        self._deltas = TextDeltas(tokenizer)
        self._stops = [stop for stop in stops if stop]
        self._longest = max((len(stop) for stop in self._stops), default=0)
        self._text = ""

    def push(self, token: int) -> bool:
        """Whether the text with ``token`` holds a stop string."""
        delta = self._deltas.push(token)
        if not delta:
            return False
        # Only the new text, and what before it could begin a stop string, needs searching.
        start = max(0, len(self._text) - self._longest + 1)
        self._text += delta
        tail = self._text[start:]
        return any(stop in tail for stop in self._stops)


class StopFilter:
    """A stream's text deltas without the first stop string and what follows it."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._text = ""
        self._sent = 0
        self._stopped = False

    def push(self, delta: str) -> str:
        """The text that may be shown now: up to a stop string, less what may still become one."""
        if self._stopped:
            return ""
        self._text += delta
        cut = cut_at_stop(self._text, self._stops)
        if len(cut) < len(self._text):
            self._stopped = True
            end = len(cut)
        else:
            end = len(self._text) - self._undecided()
        shown, self._sent = self._text[self._sent : end], max(self._sent, end)
        return shown

    def finish(self) -> str:
        """The text held back, once the generation has ended without a stop string."""
        if self._stopped:
            return ""
        rest, self._sent = self._text[self._sent :], len(self._text)
        return rest

    def _undecided(self) -> int:
        """How many characters at the text's end are the start of a stop string."""
        for length in range(min(len(self._text), max((len(s) for s in self._stops), default=1) - 1), 0, -1):
            if any(stop.startswith(self._text[-length:]) for stop in self._stops):
                return length
        return 0
