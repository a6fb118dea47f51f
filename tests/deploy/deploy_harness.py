"""Helpers for the deploy/ tests: the real programs (nginx, openssl, systemd-analyze), a real server."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from support import ROOT, missing_system_tool, require_program

DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "ai-platform.service"
NGINX_CONF = DEPLOY / "nginx" / "ai-platform.conf"
INSTALL = DEPLOY / "install.sh"
DISTRO_NGINX_CONF = Path("/etc/nginx/nginx.conf")


# The Debian package of each program these tests run (.ci/run installs them).
PACKAGES = {"nginx": "nginx", "openssl": "openssl", "systemd-analyze": "systemd"}


def require(program: str) -> str:
    """The program's path; a missing one skips the test, or fails it in CI (support.require_program)."""
    return require_program(program, PACKAGES[program])


def distro_nginx_conf() -> Path:
    """The distribution's nginx.conf, which the tests include the deploy site from, as nginx reads it."""
    require("nginx")
    if not DISTRO_NGINX_CONF.is_file():
        missing_system_tool(f"{DISTRO_NGINX_CONF} (nginx's own configuration)", PACKAGES["nginx"])
    return DISTRO_NGINX_CONF


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert process.poll() is None, f"{what} exited with {process.returncode}"
            assert time.monotonic() < deadline, f"{what} did not start"
            time.sleep(0.1)


def self_signed_certificate(folder: Path, name: str = "ai-platform.local") -> tuple[Path, Path]:
    crt, key = folder / "ai-platform.crt", folder / "ai-platform.key"
    subprocess.run(
        [require("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1",
         "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )  # fmt: skip
    return crt, key


def substitute(text: str, old: str, new: str) -> str:
    """Replace exactly one occurrence, so a changed deploy file breaks the test instead of passing it."""
    assert text.count(old) == 1, f"expected {old!r} once in the deploy file"
    return text.replace(old, new)


def main_config(folder: Path, site: Path) -> Path:
    """The distribution's own nginx.conf, including ``site`` as sites-enabled/ would, logs in ``folder``.

    The site's own logs (``/var/log/nginx/...``) go to ``folder`` too: ``site`` is included as a copy
    with only those paths changed, so that tests neither need nor touch the system's log folder.
    """
    site_text = site.read_text()
    if "/var/log/nginx/" in site_text:
        site = folder / f"included-{site.name}"
        site.write_text(site_text.replace("/var/log/nginx/", f"{folder}/"))
    text = distro_nginx_conf().read_text()
    text = re.sub(r"(?m)^pid .*$", f"pid {folder}/nginx.pid;", text)
    text = re.sub(r"(?m)^(\s*)error_log .*$", rf"\1error_log {folder}/error.log;", text)
    text = re.sub(r"(?m)^(\s*)access_log .*$", rf"\1access_log {folder}/access.log;", text)
    text = re.sub(r"(?m)^(\s*)include /etc/nginx/conf\.d/\*\.conf;", "", text)
    text = substitute(text, "include /etc/nginx/sites-enabled/*;", f"include {site};")
    text = re.sub(r"(?m)^worker_processes .*$", "worker_processes 2;", text)
    if os.geteuid() != 0:  # no user switch, and temp folders a normal user may write
        text = re.sub(r"(?m)^user .*$", "", text)
        temp = "".join(
            f"{kind}_temp_path {folder}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        text = substitute(text, "http {", "http {" + temp)
    path = folder / "nginx.conf"
    path.write_text(text)
    return path


def nginx_test(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require("nginx"), "-t", "-c", str(config)], capture_output=True, text=True)


@contextmanager
def running_nginx(config: Path, port: int) -> Iterator[None]:
    with _running([require("nginx"), "-c", str(config), "-g", "daemon off;"], port, "nginx"):
        yield


@contextmanager
def running_server(
    env: dict[str, str], cwd: Path, port: int, cli: Path | None = None, console: Path | None = None
) -> Iterator[None]:
    """``ai-platform serve`` in its own process, as systemd runs it; its console (journald's copy) into ``console``."""
    cli = cli or Path(sys.executable).parent / "ai-platform"
    with ExitStack() as stack:
        output: dict[str, Any] = {}
        if console is not None:
            sink = stack.enter_context(console.open("ab"))
            output = {"stdout": sink, "stderr": subprocess.STDOUT}
        with _running(
            [str(cli), "serve"],
            port,
            "ai-platform serve",
            env={**os.environ, **env, "PORT": str(port)},
            cwd=cwd,
            **output,
        ):
            yield


@contextmanager
def _running(command: list[str], port: int, what: str, **popen: Any) -> Iterator[None]:
    """A process that serves ``port`` for the duration of the block, then is stopped."""
    process = subprocess.Popen(command, **popen)
    try:
        wait_for_port(port, process, what)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


class Https:
    """One keep-alive HTTPS connection to nginx, trusting only the test certificate."""

    def __init__(self, port: int, ca: Path, host: str = "ai-platform.local") -> None:
        context = ssl.create_default_context(cafile=str(ca))
        context.check_hostname = False  # the certificate also names 127.0.0.1; SNI carries the host
        self.connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=60)
        self.host = host

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        self.connection.request(
            method, path, body=data, headers={"Host": self.host, "Content-Type": "application/json", **(headers or {})}
        )
        response = self.connection.getresponse()
        content = response.read()
        if response.getheader("Connection", "").lower() == "close":
            self.connection.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, content

    def close(self) -> None:
        self.connection.close()

    def json(
        self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
    ) -> tuple[int, object]:
        status, _, content = self.request(method, path, body, headers)
        return status, json.loads(content)


def plain_request(port: int, method: str, target: str, headers: dict[str, str] | None = None) -> int:
    """One request straight to the app (no nginx), ``target`` sent exactly as given; the response's status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, target, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def wait_until(condition: Any, what: str, timeout: float = 10) -> None:
    """Poll ``condition()`` until it is true (log lines and audit rows are written just after the response)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
