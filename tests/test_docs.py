"""The docs stay true: the hook reference matches the specs, each hook has a test, README's commands exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_reference_script():
    spec = importlib.util.spec_from_file_location("hook_reference", ROOT / "scripts" / "hook_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hook_reference_is_generated_from_the_specs():
    script = load_reference_script()
    assert (ROOT / "docs" / "hooks.md").read_text() == script.render(), (
        "docs/hooks.md is stale: run `python scripts/hook_reference.py > docs/hooks.md`"
    )


def test_every_hookspec_is_documented_and_tested():
    script = load_reference_script()
    hooks_doc = (ROOT / "docs" / "hooks.md").read_text()
    hook_tests = (ROOT / "tests" / "test_hooks.py").read_text()
    names = [name for name, _ in script.hookspec_functions()]
    assert len(names) == 15
    for name, fn in script.hookspec_functions():
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, f"{name} has no docstring"
        assert f"## `{name}`" in hooks_doc
        assert name.removeprefix("molting_") in hook_tests, f"{name} has no test in tests/test_hooks.py"


def test_ci_runs_the_test_command_readme_gives():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(pip install .*)$", readme, flags=re.M)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in ci
    assert any("molting run --plugin dpo" in c for c in commands)


def test_every_conformance_check_is_documented():
    from molting.testing import CHECKS

    page = (ROOT / "docs" / "conformance.md").read_text()
    for chk in CHECKS:
        assert f"| `{chk.name}` | {chk.kind} |" in page, f"docs/conformance.md lacks the check {chk.name}"


def test_every_stage_context_field_is_documented():
    import attrs

    from molting.context import StageContext

    page = (ROOT / "docs" / "stages.md").read_text()
    missing = [f.name for f in attrs.fields(StageContext) if f"| `{f.name}` |" not in page]
    assert not missing, f"docs/stages.md does not document the StageContext fields {missing}"


def test_every_stage_field_is_documented():
    import attrs

    from molting.components import Stage

    page = (ROOT / "docs" / "stages.md").read_text()
    missing = [f.name for f in attrs.fields(Stage) if f"| `{f.name}` |" not in page]
    assert not missing, f"docs/stages.md does not document the Stage fields {missing}"
