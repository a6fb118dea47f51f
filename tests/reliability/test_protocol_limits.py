"""The real ``ai-platform serve`` reached directly, without nginx (issue 11): limits on the request head,
and whitespace around the API key as its HTTP parser delivers it.

Raw sockets, because HTTP clients refuse to send what these tests send. The server has no model
(every operation would answer 503): the limits apply before any route.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import BinaryIO

import pytest

from harness import ServerProcess
from support import CLIENT_KEY

pytestmark = pytest.mark.slow

# What README.md promises: 431 past 100 header fields or 64 KiB of request line and headers.
MAX_HEADERS = 100
MAX_HEAD = 64 * 1024


@pytest.fixture
def server(serve_cli: object, tmp_path: Path) -> ServerProcess:
    return serve_cli(f"sqlite://{tmp_path / 'usage.sqlite3'}", tmp_path / "models" / "none", workers=1)  # type: ignore[operator,no-any-return]


def _head(*fields: bytes, target: bytes = b"/limits") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: test\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def _read_response(reader: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    status_line = reader.readline()
    assert status_line, "connection closed before a response"
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, reader.read(int(headers.get("content-length", "0")))


def _exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` from a thread (as a client that keeps sending would) and read the answer meanwhile."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:

        def send() -> None:
            view = memoryview(request)
            try:
                while view:
                    sent = sock.send(view[:65536])
                    view = view[sent:]
            except OSError:  # the server closed the connection: it stopped reading, as it should
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            return _read_response(sock.makefile("rb"))
        finally:
            sock.shutdown(socket.SHUT_RDWR)
            sender.join(timeout=30)


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _key(value: bytes = CLIENT_KEY.encode()) -> bytes:
    return b"X-API-Key: " + value


def _assert_431(response: tuple[int, dict[str, str], bytes]) -> None:
    status, headers, body = response
    assert status == 431, (status, body[:300])
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert set(json.loads(body)) == {"detail"}


def test_a_32_mb_header_is_refused_without_being_buffered(server: ServerProcess) -> None:
    assert _exchange(server.port, _head(_key()))[0] == 200  # warm: the first request's allocations are done
    before = _peak_rss(server.process.pid)
    _assert_431(_exchange(server.port, _head(_key(b"k" * (32 * 2**20)))))
    grown = _peak_rss(server.process.pid) - before
    assert grown < 8 * 2**20, f"peak memory grew {grown / 2**20:.1f} MB for one refused request"
    assert _exchange(server.port, _head(_key()))[0] == 200  # and it serves on


@pytest.mark.parametrize(
    ("size", "status"),
    [(MAX_HEAD - 4096, 200), (MAX_HEAD + 4096, 431), (4 * MAX_HEAD, 431)],
)
def test_the_head_may_hold_64_kib(server: ServerProcess, size: int, status: int) -> None:
    request = _head(_key(), b"Cookie: " + b"c" * (size - len(_head(_key(), b"Cookie: "))))
    assert len(request) == size
    response = _exchange(server.port, request)
    if status == 431:
        _assert_431(response)
    else:
        assert response[0] == status, response


@pytest.mark.parametrize(
    ("fields", "status"),
    [(MAX_HEADERS, 200), (MAX_HEADERS + 1, 431), (100_000, 431)],
)
def test_at_most_100_header_fields(server: ServerProcess, fields: int, status: int) -> None:
    # Host and X-API-Key count too.
    fillers = [b"X-Filler-%d: v" % i for i in range(fields - 2)]
    response = _exchange(server.port, _head(_key(), *fillers))
    if status == 431:
        _assert_431(response)
    else:
        assert response[0] == status, response
    assert _exchange(server.port, _head(_key()))[0] == 200


def test_every_worker_has_the_limits(serve_cli: object, tmp_path: Path) -> None:
    server: ServerProcess = serve_cli(f"sqlite://{tmp_path / 'usage.sqlite3'}", tmp_path / "models" / "none")  # type: ignore[operator]
    fillers = [b"X-Filler-%d: v" % i for i in range(MAX_HEADERS)]
    for _ in range(6):  # new connections, spread over both workers
        _assert_431(_exchange(server.port, _head(_key(), *fillers)))
        assert _exchange(server.port, _head(_key()))[0] == 200


def test_a_request_pipelined_before_a_refused_one_is_answered_first(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        too_many = [b"X-Filler-%d: v" % i for i in range(MAX_HEADERS)]
        sock.sendall(_head(_key()) + _head(_key(), *too_many))
        reader = sock.makefile("rb")
        assert _read_response(reader)[0] == 200
        _assert_431(_read_response(reader))
        assert reader.read() == b""  # then the server closes the connection


@pytest.mark.parametrize(
    "value",
    [b"%s", b" %s", b"\t%s", b"%s ", b"%s\t", b" \t%s \t"],
    ids=["bare", "leading-space", "leading-tab", "trailing-space", "trailing-tab", "both"],
)
def test_whitespace_around_the_key_is_ignored_on_both_sides(server: ServerProcess, value: bytes) -> None:
    assert _exchange(server.port, _head(_key(value % CLIENT_KEY.encode())))[0] == 200


@pytest.mark.parametrize("value", [b"", b" \t ", CLIENT_KEY[:10].encode() + b" " + CLIENT_KEY[10:].encode()])
def test_whitespace_is_never_a_key(server: ServerProcess, value: bytes) -> None:
    assert _exchange(server.port, _head(_key(value)))[0] == 403
