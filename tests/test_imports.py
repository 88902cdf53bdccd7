"""Imports point one way: plugins → the stage toolkit, never core → plugin or plugin → plugin.

The graph is read from the source with ``ast`` (nothing is imported), so the
test also sees imports inside functions. A plugin is a module or package
under ``plugins/`` (``molting.plugins.grpo`` and its ``trainer`` module are one
plugin); the outside examples under ``examples/`` are held to the same rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import molting

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = {"molting", *(f"molting.{name}" for name in molting.TOOLKIT)}
"""What a plugin may import from molting: the package itself and the stage toolkit's modules."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "core":
        parts[0] = "molting"
    elif parts[0] == "plugins":
        parts = ["molting", "plugins", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, str | None, int]]:
    """``(module, imported name or None, line)`` for every import of ``molting`` in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("molting"):
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("molting")]
    return found


def plugin_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["molting", "plugins"] else None


def violations(path: Path, outside: bool = False) -> list[str]:
    """What ``path`` imports that its place in the tree forbids."""
    here = "an outside plugin" if outside else module_name(path)
    mine = None if outside else plugin_of(here)
    is_plugin = outside or mine is not None or here == "molting.plugins"
    found = []
    for module, name, line in imports(path):
        where = f"{path.relative_to(ROOT)}:{line} imports {module}" + (f".{name}" if name else "")
        target = plugin_of(f"{module}.{name}") if module == "molting.plugins" and name else plugin_of(module)
        if not is_plugin and (target or module == "molting.plugins"):
            found.append(f"{where}: the core never imports a plugin")
        elif is_plugin and target and target != mine:
            found.append(f"{where}: a plugin never imports another plugin (move what both need into the core)")
        elif is_plugin and not target and module not in PUBLIC:
            found.append(f"{where}: {module} is not part of the stage toolkit (molting.TOOLKIT)")
        elif is_plugin and not target and name and name.startswith("_"):
            found.append(f"{where}: {name} is private to the core")
    return found


CORE = sorted((ROOT / "core").rglob("*.py"))
PLUGINS = sorted((ROOT / "plugins").rglob("*.py"))
OUTSIDE = sorted(p for p in (ROOT / "examples").rglob("*.py") if "build" not in p.parts and "tests" not in p.parts)


@pytest.mark.parametrize("path", CORE + PLUGINS, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path):
    assert violations(path) == []


@pytest.mark.parametrize("path", OUTSIDE, ids=lambda p: str(p.relative_to(ROOT)))
def test_outside_plugins_import_only_the_public_api(path):
    assert violations(path, outside=True) == []


def test_the_checker_sees_each_kind_of_violation(tmp_path, monkeypatch):
    """The rule is real: each forbidden edge, written into a file of the tree, is reported."""
    cases = {
        "core/x.py": ("from molting.plugins.preference import build_trainer\n", "the core never imports a plugin"),
        "plugins/x.py": ("def f():\n    from molting.plugins.dpo import dpo_loss\n", "never imports another plugin"),
        "plugins/y.py": ("from molting.pipeline import run\n", "not part of the stage toolkit"),
        "plugins/z.py": ("from molting.judging import _freeze\n", "private to the core"),
    }
    for relative, (source, expected) in cases.items():
        path = ROOT / relative
        monkeypatch.setattr(Path, "read_text", lambda self, *a, source=source, **k: source)
        assert any(expected in v for v in violations(path)), (relative, violations(path))


def test_every_toolkit_module_exists_and_is_documented():
    page = (ROOT / "docs" / "stages.md").read_text()
    for name in molting.TOOLKIT:
        assert (ROOT / "core" / f"{name}.py").exists(), name
        assert f"`molting.{name}`" in page, f"docs/stages.md does not document molting.{name}"
