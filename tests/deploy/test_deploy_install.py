"""deploy/install.sh: dry runs for both distribution families, and a real install under --prefix.

The --prefix install is the real one minus what needs root and a running systemd (packages,
the system user, chown, systemctl, nginx reload, SELinux). Its output is then checked by the
programs that read it: the venv's `ai-platform`, `systemd-analyze verify`, `nginx -t`.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_harness import INSTALL, distro_nginx_conf, main_config, nginx_test, require
from dotenv import dotenv_values

from support import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.deploy]


def install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("family", ["debian", "rhel"])
def test_dry_run_prints_the_seed_steps_and_changes_nothing(family: str, tmp_path: Path) -> None:
    result = install("--dry-run", "--family", family, "--prefix", str(tmp_path / "root"))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "root").exists()
    result = install("--dry-run", "--family", family)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    steps = [
        "apt-get install -y" if family == "debian" else "dnf install -y python3.11 nginx",
        "+ useradd --system --shell /sbin/nologin --home-dir /opt/ai_platform --no-create-home aiplatform",
        "-m venv /opt/ai_platform/venv",
        "/opt/ai_platform/venv/bin/pip install --quiet --disable-pip-version-check --no-index --find-links",
        "+ chmod 0640 /opt/ai_platform/.env",
        "+ chmod 0700 /opt/ai_platform/data",
        "+ install -m 0644 /work/main/deploy/systemd/ai-platform.service /etc/systemd/system/ai-platform.service".replace(
            "/work/main", str(ROOT)
        ),
        "+ systemctl enable ai-platform",
        "+ openssl req -x509",
        "+ nginx -t",
        "+ systemctl enable nginx",
    ]
    if family == "debian":
        steps += ["/etc/nginx/sites-enabled/ai-platform.conf", "+ rm -f /etc/nginx/sites-enabled/default"]
    else:
        steps += ["/etc/nginx/conf.d/ai-platform.conf", "+ setsebool -P httpd_can_network_connect 1"]
    for step in steps:
        assert step in out, f"{step!r} missing from:\n{out}"
    assert ("setsebool" in out) == (family == "rhel")


@pytest.fixture(scope="module")
def system_programs() -> None:
    """The programs the --prefix install runs or is checked by; looked for before the slow wheelhouse build."""
    require("openssl")
    require("systemd-analyze")
    distro_nginx_conf()


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/build-wheelhouse.sh, with the test environment's Python and package index."""
    out = tmp_path_factory.mktemp("wheelhouse")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "deploy" / "build-wheelhouse.sh"), str(out)], check=True, env=env,
                   capture_output=True, timeout=600)  # fmt: skip
    return out


@pytest.mark.usefixtures("system_programs")
def test_prefix_install_is_complete_idempotent_and_accepted_by_systemd_and_nginx(
    wheelhouse: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    python = sys.executable
    result = install("--prefix", str(root), "--wheelhouse", str(wheelhouse), "--python", python)
    assert result.returncode == 0, result.stdout + result.stderr
    app = root / "opt" / "ai_platform"

    # Settings: the example with fresh random keys, readable by the service group only.
    env_file = app / ".env"
    values = dotenv_values(env_file)
    example = dotenv_values(ROOT / ".env.example")
    assert set(values) == set(example)
    assert len(values["SECRET_KEY"] or "") >= 32 and values["SECRET_KEY"] != example["SECRET_KEY"]
    assert values["VALID_API_KEYS"] != example["VALID_API_KEYS"]
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o640
    for folder, mode in (("data", 0o700), ("logs", 0o700), ("models", 0o750)):
        assert stat.S_IMODE((app / folder).stat().st_mode) == mode, folder

    # The installed server: its own venv, every plugin loaded.
    plugins = subprocess.run([str(app / "venv" / "bin" / "ai-platform"), "plugins"], cwd=app, capture_output=True,
                             text=True, check=True)  # fmt: skip
    rows = sorted(line.split()[:3] for line in plugins.stdout.splitlines()[2:])
    assert rows == [[name, "0.1.0", "loaded"] for name in ("classify", "summarize", "translate")], plugins.stdout

    # The unit and the nginx site as installed, read by the real programs.
    unit = root / "etc" / "systemd" / "system" / "ai-platform.service"
    assert f"ExecStart={app}/venv/bin/ai-platform serve" in unit.read_text()
    verify = subprocess.run([require("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
    site = root / "etc" / "nginx" / "sites-enabled" / "ai-platform.conf"
    assert site.is_symlink()
    nginx = nginx_test(main_config(tmp_path, site))
    assert nginx.returncode == 0 and "[warn]" not in nginx.stderr, nginx.stderr
    assert stat.S_IMODE((root / "etc" / "nginx" / "tls" / "ai-platform.key").stat().st_mode) == 0o600

    # Again: nothing breaks, keys and certificate are kept.
    before = env_file.read_bytes(), (root / "etc" / "nginx" / "tls" / "ai-platform.crt").read_bytes()
    again = install("--prefix", str(root), "--wheelhouse", str(wheelhouse), "--python", python)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "exists: kept" in again.stdout
    assert (env_file.read_bytes(), (root / "etc" / "nginx" / "tls" / "ai-platform.crt").read_bytes()) == before


def test_install_without_a_wheelhouse_says_how_to_build_one(tmp_path: Path) -> None:
    result = install("--prefix", str(tmp_path / "root"), "--wheelhouse", str(tmp_path / "none"))
    assert result.returncode == 1
    assert "build one with deploy/build-wheelhouse.sh" in result.stderr
