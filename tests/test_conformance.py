"""The conformance suite: every built-in passes it, broken plugins fail it, a third-party plugin uses it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from molting.testing import PluginTests, check_plugin
from broken_losses import BROKEN
from conftest import run_molting

pytest_plugins = ["pytester"]


class TestEveryBuiltinPlugin(PluginTests):
    """Parametrised over every plugin of the molting distribution: a new built-in is covered automatically."""

    distribution = "molting"
    expected_failures = {
        "loss:aot:batch-independence": "AOT sorts the log-ratios across the batch by design",
        "loss:aot_unpaired:batch-independence": "AOT sorts the log-ratios across the batch by design",
        "loss:apo_down:gradient-direction": "APO-down lowers the chosen likelihood too, by design",
        "loss:sft:gradient-direction": "an NLL term on the chosen response; it leaves the rejected one alone",
        "loss:discopop:gradient-direction": "DiscoPOP's blend is non-monotone at zero margin (tau=0.05)",
    }


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_loss_fails_the_named_check_with_a_useful_message(name):
    component, failing_check, phrase = BROKEN[name]
    results = {r.check: r for r in check_plugin(component, skip_slow=True)}
    assert results[failing_check].status == "failed"
    assert phrase in results[failing_check].message
    assert results["description"].status == "passed"  # the rest of the report still runs


def test_expected_failures_are_reported_as_such():
    component, failing_check, _ = BROKEN["batch-coupled"]
    results = {r.check: r for r in check_plugin(component, skip_slow=True, expected_failures={failing_check: "by design"})}
    assert results[failing_check].status == "xfailed" and results[failing_check].ok
    results = {r.check: r for r in check_plugin(component, skip_slow=True, expected_failures={"dtypes": "wrongly declared"})}
    assert results["dtypes"].status == "xpassed" and not results["dtypes"].ok


def test_the_base_class_turns_checks_into_failing_tests(pytester):
    pytester.makepyfile(
        test_broken=textwrap.dedent(
            """
            import sys
            sys.path.insert(0, %r)
            from broken_losses import BROKEN
            from molting.testing import LossTests

            class TestWrongSign(LossTests):
                component = BROKEN["wrong-sign"][0]

            class TestNoisyDeclared(LossTests):
                component = BROKEN["noisy"][0]
                expected_failures = {"deterministic": "noise on purpose", "batch-independence": "noise on purpose"}
            """ % str(__import__("pathlib").Path(__file__).parent)
        )
    )
    result = pytester.runpytest("--molting-skip-slow", "-q", "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed") == 1, result.stdout.str()[-3000:]
    assert outcomes.get("xfailed") == 2
    result.stdout.fnmatch_lines(["*loss:wrong-sign gradient-direction: at zero margin*"])


# --------------------------------------------------------------------------- the third-party path


@pytest.fixture(scope="module")
def simpo_site(tmp_path_factory):
    """pip-install examples/molting-simpo (no network: no deps, no build isolation) into its own folder."""
    from pathlib import Path

    site = tmp_path_factory.mktemp("simpo-site")
    example = Path(__file__).resolve().parents[1] / "examples" / "molting-simpo"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(example)],
        check=True, capture_output=True, text=True,
    )
    return {"PYTHONPATH": str(site)}


def test_installed_simpo_is_listed(simpo_site):
    result = run_molting("plugins", env=simpo_site)
    assert result.returncode == 0
    assert "simpo  (molting-simpo 0.1.0)  ok" in result.stdout
    assert "loss     simpo" in result.stdout


def test_molting_check_passes_simpo(simpo_site):
    result = run_molting("check", "simpo", env=simpo_site)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "14 checks: 14 passed" in result.stdout


def test_molting_run_trains_simpo_without_a_reference_model(simpo_site, tmp_path):
    import json

    out = tmp_path / "simpo"
    result = run_molting("run", "--plugin", "simpo", "--max-steps", "3", "--logging-steps", "1", "--eval", "off",
                         "--set", "gamma=0.5", "--output-dir", str(out), env=simpo_site)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reference model: none" in result.stderr
    record = json.loads((out / "molting_run.json").read_text())
    assert record["loss_params"] == {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.0}
    assert record["plugins"]["simpo"]["distribution"] == "molting-simpo"


def test_molting_check_fails_a_broken_installed_plugin(tmp_path):
    from plugin_dists import make_distribution

    site = make_distribution(tmp_path / "site", "molting-wrong", "0.1", {"wrong": """
        import torch.nn.functional as F
        import molting
        from molting.plugins.dpo import DPOParams

        def wrong(inputs, params):
            z = params.beta * ((inputs.chosen_logps - inputs.ref_chosen_logps) - (inputs.rejected_logps - inputs.ref_rejected_logps))
            return molting.LossOutput(F.logsigmoid(z))

        @molting.hookimpl
        def molting_register_losses(register):
            register(molting.Loss(name="wrong", compute=wrong, params=DPOParams, description="Sign flipped."))
    """})
    result = run_molting("check", "wrong", "--skip-slow", env={"PYTHONPATH": str(site)})
    assert result.returncode == 1
    assert "FAIL  gradient-direction" in result.stdout
    assert "expected < 0 so that training raises the chosen response's probability" in result.stdout
    assert "1 failed" in result.stdout
