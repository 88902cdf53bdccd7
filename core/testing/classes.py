"""pytest base classes for the conformance suite: subclass one, point it at a component, done.

Each class generates one test per check (``test_conformance[loss:simpo-gradient-direction]``)
through its own ``pytest_generate_tests``, so it needs no fixture or plugin
from the test module.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from molting.testing.checks import Subject, checks_for, plugin_subjects, run_check, subjects_for


class ComponentTests:
    """Base class. Set ``name`` (looked up through the entry points) or ``component`` (an object)."""

    kind: ClassVar[str | None] = None
    name: ClassVar[str | None] = None
    component: ClassVar[Any] = None
    expected_failures: ClassVar[dict[str, str]] = {}
    """Check name (or ``"kind:name:check"``) → why it is expected to fail."""

    @classmethod
    def molting_subjects(cls) -> list[Subject]:
        from molting.discovery import load_plugins

        target = cls.component if cls.component is not None else cls.name
        if target is None:
            raise TypeError(f"{cls.__name__}: set `name = '...'` or `component = ...`")
        return subjects_for(target, load_plugins(), cls.kind)

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "molting_check" not in metafunc.fixturenames:
            return
        skip_slow = bool(metafunc.config.getoption("molting_skip_slow", default=False))
        params, ids = [], []
        for subject in type(self).molting_subjects():
            for chk in checks_for(subject.kind, skip_slow):
                params.append((subject, chk))
                ids.append(f"{subject.label}-{chk.name}")
        metafunc.parametrize("molting_check", params, ids=ids)

    def test_conformance(self, molting_check, tmp_path) -> None:
        subject, chk = molting_check
        import attrs

        result = run_check(chk, attrs.evolve(subject, workdir=tmp_path), self.expected_failures)
        if result.status == "skipped":
            pytest.skip(result.message)
        if result.status == "xfailed":
            pytest.xfail(result.message)
        if result.status != "passed":
            pytest.fail(f"{result.component} {result.check}: {result.message}", pytrace=False)


class LossTests(ComponentTests):
    kind = "loss"


class StageTests(ComponentTests):
    kind = "stage"


class JudgeTests(ComponentTests):
    kind = "judge"


class DatasetTests(ComponentTests):
    kind = "dataset"


class AdvantageTests(ComponentTests):
    kind = "advantage"


class SamplerTests(ComponentTests):
    kind = "sampler"


class EnvironmentTests(ComponentTests):
    kind = "environment"


class ToolParserTests(ComponentTests):
    kind = "tool_parser"


class PluginTests(ComponentTests):
    """Every component of one plugin (``name = "plugin"``) or of a whole distribution (``distribution = ...``)."""

    distribution: ClassVar[str | None] = None

    @classmethod
    def molting_subjects(cls) -> list[Subject]:
        from molting.discovery import load_plugins

        host = load_plugins()
        if cls.distribution is None:
            return super().molting_subjects()
        names = [p.name for p in host.plugins.values() if p.distribution == cls.distribution and p.status == "ok"]
        if not names:
            raise LookupError(f"no working plugin from distribution {cls.distribution!r} is installed")
        # each plugin's own components, by plugin (not subjects_for: a plugin and a component may share a name)
        return [subject for name in sorted(names) for subject in plugin_subjects(name, host)]
