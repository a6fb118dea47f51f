"""Air-gapped by proof: serving opens no connection beyond loopback and looks up no host name.

Watched from outside Python: the real ``ai-platform serve`` runs under ``strace -f``, which records every
``connect``, ``sendto`` and ``sendmsg`` of the server and of every process it starts (the model processes,
uvicorn's), native code included. An audit hook inside the interpreter, what this test used to be, never saw
onnxruntime's telemetry: its C++ code resolved ``mobile.events.data.microsoft.com`` (a DNS query: a
``connect`` to the resolver's port 53) about 10 s after the library loaded (issue 11 #18). The server turns
that off itself (``ORT_DISABLE_TELEMETRY=1`` set in ``ai_platform/__init__.py`` before onnxruntime loads),
so this test runs it without that variable in its environment.

The run covers startup, one request of each operation and ``AI_PLATFORM_AIR_GAP_IDLE_SECONDS`` (default
30) of idling, long enough for the telemetry, which fired ~10 s after onnxruntime loaded.

With remote engines in ``OPERATION_MODEL_MAP`` (issue 14), the engines' hosts are the only ones the server may
reach: the second run serves every operation from one engine on 127.0.0.1 and checks that every outbound
connection goes to that engine's address and port, and nowhere else.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from remote_fake import FakeOpenAIServer, Reply
from support import CLASSIFY, KEY, SEED_MODELS, SUMMARIZE, TRANSLATE, free_port, require_program

pytestmark = pytest.mark.slow

IDLE_SECONDS = float(os.environ.get("AI_PLATFORM_AIR_GAP_IDLE_SECONDS", "30"))
TRACED = "connect,sendto,sendmsg"
FAMILY = re.compile(r"sa_family=(AF_\w+)")
IPV4 = re.compile(r'inet_addr\("([^"]+)"\)')
IPV6 = re.compile(r'inet_pton\(AF_INET6, "([^"]+)"')
UNIX_PATH = re.compile(r'sun_path="([^"]*)"')
# IP addresses are checked one by one (loopback only); AF_UNSPEC only dissolves a UDP socket's association.
LOCAL_OR_IP_FAMILIES = ("AF_UNIX", "AF_NETLINK", "AF_UNSPEC", "AF_INET", "AF_INET6")
# Local sockets are fine, except a name service's: systemd-resolved answers host lookups over this one.
RESOLVER_SOCKETS = ("/run/systemd/resolve/io.systemd.Resolve",)


def strace_command(log: Path) -> list[str]:
    strace = require_program("strace", "strace")
    # -f: every process and thread the server starts; --seccomp-bpf: only these calls stop the tracee.
    # (strace -o FILE PROG ignores SIGTERM itself: stop the program, and strace ends with it.)
    return [strace, "-f", "-qq", "--seccomp-bpf", "-e", f"trace={TRACED}", "-e", "signal=none", "-o", str(log)]


def outside_loopback(trace: str) -> list[str]:
    """The traced calls that address anything but loopback, a local (UNIX or netlink) socket or no one."""
    found = []
    for line in trace.splitlines():
        other_family = any(f not in LOCAL_OR_IP_FAMILIES for f in FAMILY.findall(line))
        remote = any(
            not ipaddress.ip_address(a.split("%")[0]).is_loopback for a in IPV4.findall(line) + IPV6.findall(line)
        )
        resolver = any(path in RESOLVER_SOCKETS for path in UNIX_PATH.findall(line))
        if other_family or remote or resolver:
            found.append(line)
    return found


def stop_traced(tracer: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the program strace runs (the server), which stops its model processes; strace ends with the last."""
    with contextlib.suppress(psutil.Error):
        for process in psutil.Process(tracer.pid).children():
            process.terminate()
    try:
        tracer.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(psutil.Error):
            for process in psutil.Process(tracer.pid).children(recursive=True):
                process.kill()
        tracer.wait(timeout=30)
        raise


def test_the_recorder_sees_native_network_calls(tmp_path: Path) -> None:
    """The recorder works: a UDP packet to a documentation address (as a DNS query is sent) is caught."""
    log = tmp_path / "probe.strace"
    probe = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'x', ('192.0.2.1', 53))"
    subprocess.run([*strace_command(log), sys.executable, "-c", probe], check=False, capture_output=True)
    assert log.is_file(), "strace recorded nothing: is ptrace allowed here?"
    caught = outside_loopback(log.read_text())
    assert len(caught) == 1 and "192.0.2.1" in caught[0] and "htons(53)" in caught[0], log.read_text()
    loopback = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'x', ('127.0.0.1', 9))"
    subprocess.run([*strace_command(log), sys.executable, "-c", loopback], check=False, capture_output=True)
    assert "127.0.0.1" in log.read_text() and outside_loopback(log.read_text()) == []


INET_CONNECT = re.compile(r"\bconnect\(\d+, \{sa_family=AF_INET6?, sin6?_port=htons\((\d+)\)")


def inet_connections(trace: str) -> set[tuple[str, int]]:
    """Every (address, port) an AF_INET or AF_INET6 socket was connected to."""
    found = set()
    for line in trace.splitlines():
        if (port := INET_CONNECT.search(line)) is not None:
            for address in IPV4.findall(line) + IPV6.findall(line):
                found.add((address, int(port.group(1))))
    return found


def test_remote_engines_are_the_only_hosts_reached(env: dict[str, str], tmp_path: Path) -> None:
    engine = FakeOpenAIServer()
    engine.default = Reply(top_logprobs=[("tech", -0.1), ("bill", -2.0)])  # also what classify's scoring reads
    log = tmp_path / "server.strace"
    port = free_port()
    remote_map = {operation: engine.url() for operation in SEED_MODELS}
    variables = {**os.environ, **env, "OPERATION_MODEL_MAP": json.dumps(remote_map)}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        variables.pop(name, None)
    # A proxy in the environment must not be used (trust_env=False): it would be a second host.
    variables["HTTP_PROXY"] = variables["ALL_PROXY"] = "http://192.0.2.1:3128"
    cli = Path(sys.executable).parent / "ai-platform"
    tracer = subprocess.Popen(
        [*strace_command(log), str(cli), "serve", "--port", str(port)], env=variables, cwd=tmp_path
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{base}/health", timeout=5)
                if health.status_code == 200 and health.json()["status"] == "healthy":
                    break
            except httpx.HTTPError:
                pass
            assert tracer.poll() is None and time.monotonic() < deadline, "server did not start or see its engine"
            time.sleep(0.2)
        for operation, body in (("summarize", SUMMARIZE), ("translate", TRANSLATE), ("classify", CLASSIFY)):
            r = httpx.post(f"{base}/operations/{operation}", json=body, headers=KEY, timeout=60)
            assert r.status_code == 200, r.text
        time.sleep(min(IDLE_SECONDS, 3))  # no local model: no onnxruntime, no telemetry to wait for
    finally:
        stop_traced(tracer)
        engine.close()
    trace = log.read_text()
    assert engine.chat_requests(), "the engine saw no request"
    assert inet_connections(trace) == {("127.0.0.1", engine.port)}, "\n".join(
        line for line in trace.splitlines() if INET_CONNECT.search(line)
    )
    assert outside_loopback(trace) == [], "\n".join(outside_loopback(trace))


def test_serving_touches_no_network_beyond_loopback(env: dict[str, str], tiny_model_dir: Path, tmp_path: Path) -> None:
    models = Path(env["MODELS_DIR"])
    models.mkdir()
    for folder in SEED_MODELS.values():
        (models / folder).symlink_to(tiny_model_dir, target_is_directory=True)
    home = tmp_path / "home"  # where onnxruntime's telemetry keeps its database (~/.cache/Microsoft/...)
    home.mkdir()
    log = tmp_path / "server.strace"
    port = free_port()
    variables = {**os.environ, **env, "HOME": str(home), "MODEL_ISOLATION": "process"}
    # Prove it without the usual switches; ORT_DISABLE_TELEMETRY is in this (pytest's) environment only
    # because importing ai_platform here set it: the server must set it for itself.
    for name in ("ORT_DISABLE_TELEMETRY", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY"):
        variables.pop(name, None)
    cli = Path(sys.executable).parent / "ai-platform"
    tracer = subprocess.Popen(
        [*strace_command(log), str(cli), "serve", "--port", str(port)], env=variables, cwd=tmp_path
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"{base}/health", timeout=5)
                health.raise_for_status()
                break
            except httpx.HTTPError:
                assert tracer.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        assert health.json()["status"] == "healthy", health.text
        for operation, body in (("summarize", SUMMARIZE), ("translate", TRANSLATE), ("classify", CLASSIFY)):
            assert httpx.post(f"{base}/operations/{operation}", json=body, headers=KEY, timeout=120).status_code == 200
        time.sleep(IDLE_SECONDS)
    finally:
        stop_traced(tracer)
    trace = log.read_text()
    calls = [line for line in trace.splitlines() if re.search(rf"\b({TRACED.replace(',', '|')})\(", line)]
    processes = {line.split()[0] for line in calls}
    print(f"strace: {len(calls)} calls from {len(processes)} processes/threads; outside loopback:")
    print("\n".join(outside_loopback(trace)) or "none")
    assert calls, "strace recorded no call at all: the recorder did not see the server"
    assert outside_loopback(trace) == [], "\n".join(outside_loopback(trace))
    assert not (home / ".cache" / "Microsoft").exists(), "onnxruntime's telemetry created its database"
