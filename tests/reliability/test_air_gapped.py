"""Air-gapped by proof: serving opens no connection beyond loopback and looks up no host name."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from support import CLASSIFY, KEY, SEED_MODELS, SUMMARIZE, TRANSLATE, free_port

pytestmark = pytest.mark.slow

# Loaded first in the server's interpreter: every socket connect, send and name lookup passes an
# audit hook that records and refuses anything not on loopback (library telemetry, model hubs).
GUARD = """
import ipaddress, socket, sys
LOG = {log!r}
def _local(host):
    try:
        return ipaddress.ip_address(str(host).split('%')[0]).is_loopback
    except ValueError:
        return host in ('localhost', '', None)
def _hook(event, args):
    if event in ('socket.connect', 'socket.sendto', 'socket.sendmsg') and len(args) > 1:
        address = args[1]
        if isinstance(address, tuple) and not _local(address[0]):
            open(LOG, 'a').write(f'{{event}} {{address}}\\n'); raise OSError('network is off limits')
    if event == 'socket.getaddrinfo' and not _local(args[0]):
        open(LOG, 'a').write(f'{{event}} {{args[0]}}\\n'); raise OSError('name lookups are off limits')
sys.addaudithook(_hook)
"""


def test_serving_touches_no_network_beyond_loopback(env: dict[str, str], tiny_model_dir: Path, tmp_path: Path) -> None:
    attempts = tmp_path / "network-attempts.log"
    attempts.touch()
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD.format(log=str(attempts)))
    models = Path(env["MODELS_DIR"])
    models.mkdir()
    for folder in SEED_MODELS.values():
        (models / folder).symlink_to(tiny_model_dir, target_is_directory=True)
    port = free_port()
    variables = {**os.environ, **env, "PYTHONPATH": str(guard)}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY"):
        variables.pop(name, None)  # prove it without the usual switches
    # The guard works: a connection to a documentation address is caught and refused.
    probe = "import socket; socket.create_connection(('192.0.2.1', 80), timeout=1)"
    assert subprocess.run([sys.executable, "-c", probe], env=variables, capture_output=True).returncode != 0
    assert "192.0.2.1" in attempts.read_text()
    attempts.write_text("")
    cli = Path(sys.executable).parent / "ai-platform"
    server = subprocess.Popen([str(cli), "serve", "--port", str(port)], env=variables, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                httpx.get(f"{base}/health", timeout=5).raise_for_status()
                break
            except httpx.HTTPError:
                assert server.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        for operation, body in (("summarize", SUMMARIZE), ("translate", TRANSLATE), ("classify", CLASSIFY)):
            assert httpx.post(f"{base}/operations/{operation}", json=body, headers=KEY, timeout=120).status_code == 200
        # Native code (onnxruntime, tokenizers) bypasses audit hooks: check the process's own sockets too.
        for connection in psutil.Process(server.pid).net_connections(kind="inet"):
            for address in (connection.laddr, connection.raddr):
                assert not address or ipaddress.ip_address(address.ip).is_loopback, connection
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert attempts.read_text() == "", attempts.read_text()
