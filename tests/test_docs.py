"""docs/plugins.md: every Python example runs, every signature in the text is the code's, the install
command works from this checkout, and every hook is documented and tested."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import shlex
import sys
import tomllib
import types
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import ai_platform
from ai_platform import hookspecs, operations, plugin_config, testing
from ai_platform.plugins import ENTRY_POINT_GROUP, new_plugin_manager
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


INLINE_CODE = re.compile(r"`([^`]+)`")  # may wrap across lines
SIGNATURE = re.compile(r"([A-Za-z_][\w.]*)\((.*)\)", flags=re.DOTALL)  # `Name(...)`, in `async with Name(...) as x:`


def documented_objects(platform_client: Any) -> dict[str, Callable[..., Any]]:
    """What the guide's names stand for: the public API, the test kit, the hooks and the fixture's factory."""
    names: dict[str, Any] = {}
    for module in (ai_platform, operations, plugin_config, testing):
        names.update({n: getattr(module, n) for n in dir(module) if not n.startswith("_")})
    names.update({hook: getattr(hookspecs, hook) for hook in HOOKS})
    names["platform_client"] = platform_client
    return {name: value for name, value in names.items() if callable(value)}


def resolve(name: str, known: dict[str, Callable[..., Any]]) -> Callable[..., Any] | None:
    if "." not in name:
        return known.get(name)
    module, _, attribute = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attribute, None)  # type: ignore[no-any-return]
    except ImportError:
        return None  # `operation.prompt(request)`: a value, not a module


def real_default(target: Any, parameter: inspect.Parameter) -> Any:
    if dataclasses.is_dataclass(target):
        field = next((f for f in dataclasses.fields(target) if f.name == parameter.name), None)
        if field is not None and field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
    return parameter.default


def signature_problems(target: Any, arguments: str) -> list[str]:
    """How ``arguments`` disagrees with ``target``, read as a signature (`*, text, n=None`) and as a call
    (`hookimpl(wrapper=True)`, `RequestValidationError([...])`); none if either reading is right."""
    if arguments.strip() in ("", "..."):
        return []
    real = inspect.signature(target)
    try:
        call = ast.parse(f"documented({arguments})", mode="eval").body
        real.bind_partial(*call.args, **{k.arg: k.value for k in call.keywords if k.arg})  # type: ignore[attr-defined]
        return []
    except (SyntaxError, TypeError) as exc:
        as_call = str(exc)
    try:
        written = ast.parse(f"def documented({arguments}): pass").body[0].args  # type: ignore[attr-defined]
    except SyntaxError:
        return [as_call]
    problems = []
    params = list(real.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    written_positional = written.posonlyargs + written.args
    with_defaults = [a.arg for a in written_positional][len(written_positional) - len(written.defaults) :]
    defaults = dict(zip(with_defaults, written.defaults, strict=True))
    defaults.update({a.arg: d for a, d in zip(written.kwonlyargs, written.kw_defaults, strict=True) if d is not None})
    for index, argument in enumerate(written_positional):
        if index >= len(positional) or positional[index].name != argument.arg:
            problems.append(f"{argument.arg!r} is not positional parameter {index + 1} (keyword-only? write `*, `)")
    for argument in written.kwonlyargs:
        parameter = real.parameters.get(argument.arg)
        if parameter is None or parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            problems.append(f"no keyword parameter {argument.arg!r}")
    if written.vararg and not any(p.kind is p.VAR_POSITIONAL for p in params):
        problems.append(f"no *{written.vararg.arg}")
    shown = {a.arg for a in written_positional + written.kwonlyargs}
    for parameter in params:
        variadic = parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        required = parameter.default is parameter.empty and not variadic
        if required and parameter.name not in shown:
            problems.append(f"required parameter {parameter.name!r} is left out")
        if parameter.name not in shown:
            continue
        if required and parameter.name in defaults:
            problems.append(f"{parameter.name!r} is required; the text gives it a default")
        elif not required and parameter.name not in defaults:
            problems.append(f"{parameter.name!r} is optional; the text shows no default")
        elif parameter.name in defaults:
            node = defaults[parameter.name]
            if isinstance(node, ast.Constant) and node.value is Ellipsis:
                continue
            shown_default = eval(compile(ast.Expression(node), "doc", "eval"), {"__builtins__": {"set": set}})
            if shown_default != real_default(target, parameter):
                problems.append(f"{parameter.name}={ast.unparse(node)}, but the default is {parameter.default!r}")
    return problems


def test_signatures_in_the_text_are_the_codes(platform_client: Any) -> None:
    """`Completion(text, output_tokens, finish_reason)` read as positional while the class is keyword-only."""
    known = documented_objects(platform_client)
    text = DOC.read_text()
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # the code blocks run: test_python_examples_run
    checked, problems = [], []
    for span in INLINE_CODE.findall(prose):
        match = SIGNATURE.search(span)
        target = resolve(match[1], known) if match else None
        if match is None or target is None:
            continue
        arguments = " ".join(match[2].split())
        checked.append(match[1])
        problems += [f"`{match[1]}({arguments})`: {p}" for p in signature_problems(target, arguments)]
    assert problems == []
    assert {"Completion", "Choice", "Generate", "Choose", "Limits", "Example", "FakeEngine", "platform_client"} <= set(
        checked
    ), checked


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        ("text, output_tokens, finish_reason", "'text' is not positional parameter 1"),
        ("*, text, output_tokens", "required parameter 'finish_reason' is left out"),
        ("*, text, output_tokens, finish_reason, seed=None", "no keyword parameter 'seed'"),
        ('"x", 3, "stop"', "too many positional arguments"),
    ],
)
def test_the_signature_check_catches_what_the_issue_saw(written: str, problem: str) -> None:
    assert any(problem in p for p in signature_problems(operations.Completion, written))


def install_command(text: str) -> list[str]:
    """The one documented command that sets up a plugin author's environment."""
    lines = [line for line in text.splitlines() if line.startswith("pip install -e '.[") and "plugins/" in line]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def test_the_documented_install_command_works_from_this_checkout() -> None:
    """Run from the platform's folder, the command names the server and every built-in plugin, with real extras."""
    command = install_command(DOC.read_text())
    assert install_command((ROOT / "README.md").read_text()) == command  # the same in both places
    assert command[:2] == ["pip", "install"] and all(a == "-e" for a in command[2::2]), command
    targets = command[3::2]
    root, _, extras = targets[0].partition("[")
    assert root == "."
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(extras.rstrip("]").split(",")) <= set(pyproject["project"]["optional-dependencies"])
    assert {"pytest", "anyio", "httpx"} <= {
        re.split(r"[<>=\[ ]", requirement)[0] for requirement in pyproject["project"]["optional-dependencies"]["test"]
    }  # what the test kit and a scaffolded plugin's tests import
    makefile = (ROOT / "Makefile").read_text()
    built_ins = re.search(r"^PLUGINS := (.*)$", makefile, flags=re.MULTILINE)
    assert built_ins is not None
    assert targets[1:] == built_ins[1].split()  # every built-in, as `make install` installs them
    for target in targets[1:]:
        entry_points = tomllib.loads((ROOT / target / "pyproject.toml").read_text())["project"]["entry-points"]
        assert ENTRY_POINT_GROUP in entry_points, target


def test_toml_examples_parse_and_use_the_real_entry_point_group() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert blocks
    for block in blocks:
        data = tomllib.loads(block)
        if "project" in data:
            assert list(data["project"]["entry-points"]) == [ENTRY_POINT_GROUP]
