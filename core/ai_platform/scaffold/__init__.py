"""``ai-platform plugins new NAME``: a new operation package that passes its own tests at once."""

from __future__ import annotations

from pathlib import Path
from string import Template

from ai_platform.operations import NAME_PATTERN

TEMPLATE_DIR = Path(__file__).parent / "template"

# template file -> path in the new package ($package is replaced)
FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "operation.py.tmpl": "$package/__init__.py",
    "test_operation.py.tmpl": "tests/test_$name.py",
}


def create_plugin(name: str, parent: Path) -> Path:
    """Write the package ``ai-platform-<name>`` under ``parent`` and return its folder."""
    if not NAME_PATTERN.match(name):
        raise ValueError(f"operation name {name!r} must match {NAME_PATTERN.pattern}")
    values = {"name": name, "package": f"ai_platform_{name}", "distribution": f"ai-platform-{name.replace('_', '-')}"}
    root = parent / values["distribution"]
    if root.exists():
        raise FileExistsError(f"{root} already exists")
    for template, target in FILES.items():
        path = root / Template(target).substitute(values)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template((TEMPLATE_DIR / template).read_text()).substitute(values))
    (root / values["package"] / "py.typed").touch()
    return root
