"""The environment and tool-parser conformance checks: the built-ins pass, an outside distribution
(examples/molting-guess) passes as a user installs it, and each deliberately broken component fails the check
named for it with a message that says what to fix."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from molting.testing import check_plugin

from broken_environments import BROKEN
from conftest import run_molting

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "molting-guess"


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_environment_or_parser_fails_the_named_check(name):
    component, failing_check, phrase = BROKEN[name]
    results = {r.check: r for r in check_plugin(component)}
    assert results[failing_check].status == "failed", results[failing_check]
    assert phrase in results[failing_check].message
    assert results["description"].status == "passed"  # the rest of the report still runs


@pytest.fixture(scope="module")
def guess_site(tmp_path_factory):
    """pip-install examples/molting-guess (no network: no deps, no build isolation) into its own folder."""
    site = tmp_path_factory.mktemp("guess-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(EXAMPLE)], check=True, capture_output=True, text=True)
    return {"PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}


def test_the_installed_environment_is_listed_and_passes_molting_check(guess_site):
    listed = run_molting("plugins", env=guess_site)
    assert "guess  (molting-guess 0.1.0)  ok" in listed.stdout
    assert re.search(r"environment +guess-number", listed.stdout)
    result = run_molting("check", "guess-number", env=guess_site)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "11 checks: 11 passed" in result.stdout


def test_the_example_authors_own_tests_pass(guess_site):
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                            capture_output=True, text=True, env={**__import__("os").environ, **guess_site},
                            cwd=EXAMPLE, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"\d+ passed", result.stdout)


def test_molting_check_reports_a_broken_installed_environment(tmp_path):
    from plugin_dists import make_distribution

    site = make_distribution(tmp_path / "site", "molting-dice", "0.1", {"dice": """
        import random
        import molting
        from molting.environments import Episode, Turn

        class Roll(Episode):
            def step(self, turn):
                return Turn(reward=random.random(), done=True)   # not from the seed

        @molting.hookimpl
        def molting_register_environments(register):
            register(molting.Environment(name="dice", start=lambda row, seed, params: Roll("Roll."),
                                         example_rows=lambda: [{"prompt": "Roll."}] * 2,
                                         description="A reward from the global random state."))
    """})
    result = run_molting("check", "dice", env={"PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    assert "FAIL  env-reset-deterministic" in result.stdout
    assert "draw any randomness from the seed start() gets" in result.stdout
