"""`ai-platform plugins new NAME` writes a package that passes its own tests immediately."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_scaffolded_plugin_passes_its_own_tests(tmp_path: Path) -> None:
    cli = Path(sys.executable).parent / "ai-platform"
    subprocess.run([str(cli), "plugins", "new", "plain_english", "--dir", str(tmp_path)], check=True)
    root = tmp_path / "ai-platform-plain-english"
    assert (root / "ai_platform_plain_english" / "__init__.py").is_file()
    assert 'plain_english = "ai_platform_plain_english"' in (root / "pyproject.toml").read_text()
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root)],
        cwd=root, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_scaffolded_plugin_type_checks_without_ignores(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy comes with the dev extra")
    cli = Path(sys.executable).parent / "ai-platform"
    subprocess.run([str(cli), "plugins", "new", "plain_english", "--dir", str(tmp_path)], check=True)
    root = tmp_path / "ai-platform-plain-english"
    assert "type: ignore" not in (root / "ai_platform_plain_english" / "__init__.py").read_text()
    # The package's own [tool.mypy] (strict, which reports unused ignores too), as its author runs it.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / ".mypy_cache")],
        cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["Bad-Name", "1abc", ""])
def test_scaffold_refuses_bad_names(tmp_path: Path, name: str) -> None:
    cli = Path(sys.executable).parent / "ai-platform"
    result = subprocess.run([str(cli), "plugins", "new", name, "--dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode != 0 and "must match" in result.stderr
