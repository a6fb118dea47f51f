"""docs/plugins.md: every Python example runs, and every hook is documented and tested."""

from __future__ import annotations

import re
import sys
import types
from typing import Any

import anyio
import pytest

from ai_platform import hookspecs
from ai_platform.plugins import new_plugin_manager
from support import ROOT

DOC = ROOT / "docs" / "plugins.md"


def test_python_examples_run(monkeypatch: pytest.MonkeyPatch, platform_client: Any) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 5
    # A real module, so that msgspec can resolve the examples' annotations.
    module = types.ModuleType("docs_plugins_examples")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), module.__dict__)
    anyio.run(module.test_headline_is_served, platform_client, "asyncio")


HOOKS = sorted(new_plugin_manager().hook.__dict__)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook: str) -> None:
    assert f"### {hook}" in DOC.read_text()
    assert getattr(hookspecs, hook).__doc__


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook: str) -> None:
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    assert f"def test_hook_{hook}" in tests
