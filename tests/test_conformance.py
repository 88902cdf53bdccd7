"""The conformance suite: every built-in passes it, broken plugins fail it, a third-party plugin uses it."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import attrs
import pytest
import torch

import molting
from molting import GroupInputs, PreferenceInputs, RewardInputs, UnpairedInputs
from molting.discovery import load_plugins
from molting.errors import PluginError
from molting.testing import (Expectation, InputsGenerator, PluginTests, ZeroMargin, check_plugin, example_inputs_for,
                             generator_for)
from molting.testing import checks, inputs as testing_inputs
from broken_losses import BROKEN
from broken_stages import BROKEN as BROKEN_STAGES
from conftest import run_molting
from plugin_dists import HINGE_LOSS, make_distribution

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


# --------------------------------------------------------------------------- stages


STAGE_RUN_CHECKS = ("refuses-bad-rows", "writes-what-it-produces", "reloads-with-transformers", "calls-the-hooks")


@pytest.mark.parametrize("name", sorted(BROKEN_STAGES))
def test_a_broken_stage_fails_the_named_check_with_a_useful_message(name):
    component, failing_check, phrase = BROKEN_STAGES[name]
    results = {r.check: r for r in check_plugin(component)}
    assert results[failing_check].status == "failed", results[failing_check]
    assert phrase in results[failing_check].message
    assert results["description"].status == "passed"  # the rest of the report still runs


def test_the_stage_checks_share_one_short_run(monkeypatch):
    """refuses-bad-rows makes its two runs on bad rows; the other three checks share one run, then it is dropped."""
    runs = []
    real = checks._run_stage

    def counting(subject, rows, where):
        runs.append(where.name)
        return real(subject, rows, where)

    monkeypatch.setattr(checks, "_run_stage", counting)
    before = set(checks._SHORT_RUNS)  # the test classes' runs stay cached for the session
    results = check_plugin("preference", kind="stage", checks=STAGE_RUN_CHECKS)
    assert [(r.check, r.status) for r in results] == [(name, "passed") for name in STAGE_RUN_CHECKS]
    assert sorted(runs) == ["bad-0", "bad-1", "short-run"]
    assert set(checks._SHORT_RUNS) == before  # check_plugin drops its runs with its scratch directory


def test_a_stage_without_default_data_or_columns_is_skipped_with_the_reason():
    bare = molting.Stage(name="bare", run=lambda context: {}, description="Runs nothing.")
    results = {r.check: r for r in check_plugin(bare, kind="stage")}
    assert results["refuses-bad-rows"].status == "skipped"
    assert results["refuses-bad-rows"].message == "stage:bare declares no columns (Stage.columns)"
    for name in STAGE_RUN_CHECKS[1:]:
        assert results[name].status == "skipped"
        assert results[name].message == "stage:bare has no default data (Stage.default_data) to run on"


def test_the_quick_settings_cap_sampling_and_keep_the_rest():
    grpo = load_plugins(disabled=[]).get("stage", "grpo")
    assert grpo.demo_defaults["num_generations"] == 8 and grpo.demo_defaults["max_new_tokens"] == 20
    params = checks._quick_params(grpo)  # the stage's hyperparameters among its demo defaults, sampling capped
    assert params == {"num_generations": 4, "max_new_tokens": 12, "beta": 0.0}


NUMERIC_LOSS_CHECKS = ("output-shapes", "finite-on-extreme-inputs", "gradient-direction", "batch-independence",
                       "inputs-not-mutated", "deterministic", "dtypes")
BUILTIN_LOSSES = sorted(n for n, r in load_plugins(disabled=[]).components["loss"].items() if r.plugin.distribution == "molting")


@pytest.mark.parametrize("name", BUILTIN_LOSSES)
def test_every_builtin_loss_gets_the_numeric_checks(name):
    """No built-in loss is skipped for want of a generator: its stage names an inputs class that has one."""
    host = load_plugins(disabled=[])
    loss = host.get("loss", name)
    assert generator_for(host.get("stage", loss.stage).inputs) is not None
    assert checks._loss_inputs(checks.Subject("loss", loss, host))[0] is loss


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


def test_the_stage_base_class_shares_one_run_across_its_tests(pytester):
    pytester.makepyfile(
        test_stage=textwrap.dedent(
            """
            import sys
            sys.path.insert(0, %r)
            from broken_stages import BROKEN
            from molting.testing import StageTests, checks

            RUNS = []
            real = checks._run_stage
            def counting(subject, rows, where, **settings):
                RUNS.append(where.name)
                return real(subject, rows, where, **settings)

            checks._run_stage = counting

            class TestNoCallbacks(StageTests):
                component = BROKEN["no-callbacks"][0]

            def test_zz_one_short_run():
                assert sorted(RUNS) == ["bad-0", "bad-1", "short-run"]

            def teardown_module():
                checks._run_stage = real  # pytester runs in this process
            """ % str(__import__("pathlib").Path(__file__).parent)
        )
    )
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed") == 1 and outcomes.get("passed") == 6, result.stdout.str()[-3000:]
    line = "*stage:no-callbacks calls-the-hooks: stage:no-callbacks never called the molting_trainer_callbacks hook*"
    result.stdout.fnmatch_lines([line])


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
    assert re.search(r"loss +simpo", result.stdout)


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


# --------------------------------------------------------------------------- the example-input generators


def _documented_preference(x, reference):
    b = x.chosen_logps.shape[0]
    assert x.chosen_logps.shape == x.rejected_logps.shape == (b,)
    for ref in (x.ref_chosen_logps, x.ref_rejected_logps):
        assert (ref is not None and ref.shape == (b,)) if reference else ref is None
    assert x.chosen_lengths.shape == x.rejected_lengths.shape == (b,) and not x.chosen_lengths.is_floating_point()
    assert x.chosen_token_logps.shape == x.chosen_mask.shape and x.chosen_mask.shape[0] == b
    assert set(x.chosen_mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(x.chosen_mask.sum(dim=1).long(), x.chosen_lengths)  # the mask covers the counted tokens
    assert torch.allclose(x.chosen_token_logps.float().sum(dim=1), x.chosen_logps.float(), rtol=2e-2)
    assert (x.chosen_token_logps[x.chosen_mask == 0] == 0).all()


def _documented_unpaired(x, reference):
    b = x.logps.shape[0]
    assert x.logps.shape == x.labels.shape == x.lengths.shape == (b,)
    assert x.labels.dtype == torch.bool and not x.lengths.is_floating_point()
    if reference:
        assert x.ref_logps.shape == (b,)
        assert x.kl.shape == () and float(x.kl) >= 0  # a batch-level scalar, clamped at 0
    else:
        assert x.ref_logps is None and x.kl is None


def _documented_reward(x, reference):
    b = x.chosen_rewards.shape[0]
    assert x.chosen_rewards.shape == x.rejected_rewards.shape == (b,)
    assert x.margin is None or x.margin.shape == (b,)


def _documented_group(x, reference):
    b, t = x.logps.shape
    assert x.old_logps.shape == x.mask.shape == (b, t) and x.advantages.shape == (b,)
    assert (x.ref_logps is not None and x.ref_logps.shape == (b, t)) if reference else x.ref_logps is None
    assert set(x.mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(x.mask, x.mask.sort(dim=1, descending=True).values)  # right-padded
    assert t <= x.max_completion_length
    assert int(x.num_items_in_batch) == int(x.mask.sum())  # one process, one step per generation
    assert x.num_processes == 1 and x.steps_per_generation == 1


DOCUMENTED = {PreferenceInputs: _documented_preference, UnpairedInputs: _documented_unpaired,
              RewardInputs: _documented_reward, GroupInputs: _documented_group}


def _plausible(x):
    """What every example batch has beyond its shapes: realistic values and the variety the checks rely on."""
    if isinstance(x, PreferenceInputs):
        logps = torch.stack([v.float() for v in (x.chosen_logps, x.rejected_logps, x.ref_chosen_logps,
                                                 x.ref_rejected_logps) if v is not None])
        assert ((logps >= -60.5) & (logps <= -0.99)).all()
        assert ((x.chosen_lengths >= 3) & (x.chosen_lengths <= 30)).all()
    elif isinstance(x, UnpairedInputs):
        assert x.labels.any() and (~x.labels).any()  # both labels
        assert (x.logps <= 0).all() and (x.ref_logps is None or (x.ref_logps <= 0).all())
    elif isinstance(x, RewardInputs):
        assert torch.isfinite(x.chosen_rewards).all() and (x.margin >= 0).all()
    else:
        assert (x.logps <= 0).all() and (x.old_logps <= 0).all()
        assert (x.advantages > 0).any() and (x.advantages < 0).any()  # both signs
        assert len(set(x.mask.sum(dim=1).tolist())) > 1  # varying lengths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("reference", [True, False], ids=["reference", "no-reference"])
@pytest.mark.parametrize("cls", list(DOCUMENTED), ids=lambda c: c.__name__)
def test_each_generator_builds_its_documented_fields(cls, reference, dtype):
    x = example_inputs_for(cls, batch=6, dtype=dtype, reference=reference)
    assert type(x) is cls
    DOCUMENTED[cls](x, reference)
    _plausible(x)
    floats = [v for v in checks._tensor_fields(x).values() if v.is_floating_point()]
    assert floats and all(v.dtype == dtype for v in floats)
    again = checks._tensor_fields(example_inputs_for(cls, batch=6, dtype=dtype, reference=reference))
    assert all(torch.equal(value, again[name]) for name, value in checks._tensor_fields(x).items())  # seeded


CASES = [(cls, reference, case) for cls in DOCUMENTED for reference in (True, False)
         for case in [*generator_for(cls).extreme_cases(reference), "zero margin"]]


@pytest.mark.parametrize(("cls", "reference", "case"), CASES,
                         ids=[f"{c.__name__}-{'ref' if r else 'noref'}-{case}" for c, r, case in CASES])
def test_each_extreme_and_zero_margin_case_keeps_the_documented_fields(cls, reference, case):
    generator = generator_for(cls)
    if case == "zero margin":
        zero = generator.zero_margin(reference)
        x = zero.inputs
        for claim in zero.expectations:
            assert claim.field in generator.gradient_fields and claim.sign in (-1, 0, 1)
            assert claim.where is None or claim.where.shape == getattr(x, claim.field).shape
    else:
        x = generator.extreme_cases(reference)[case]
    assert type(x) is cls
    DOCUMENTED[cls](x, reference)
    inputs, leaves = generator.with_gradient(x)
    assert leaves and all(leaf.requires_grad and leaf.is_leaf for leaf in leaves.values())
    assert set(leaves) <= set(generator.gradient_fields)


@pytest.mark.parametrize("cls", list(DOCUMENTED), ids=lambda c: c.__name__)
def test_permuting_reorders_the_batch_fields_and_keeps_the_batch_level_ones(cls):
    generator = generator_for(cls)
    x = generator.example(batch=6)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    y = generator.permute(x, order)
    for field in attrs.fields(cls):
        before, after = getattr(x, field.name), getattr(y, field.name)
        if field.name in generator.batch_fields and before is not None:
            assert torch.equal(after, before[order]), field.name
        else:  # kl, num_items_in_batch, max_completion_length, ...: properties of the whole batch
            assert after is before, field.name
    DOCUMENTED[cls](y, True)


def test_example_inputs_stays_the_preference_generator():
    from molting.testing import example_inputs, with_logps

    x = example_inputs(batch=3, reference=False)
    assert x.ref_chosen_logps is None and x.chosen_logps.shape == (3,)
    y = with_logps(x, x.chosen_logps * 2, x.rejected_logps)
    assert torch.allclose(y.chosen_token_logps.sum(dim=1), x.chosen_logps * 2)
    assert torch.equal(example_inputs_for(PreferenceInputs, batch=3, reference=False).chosen_logps, x.chosen_logps)


# --------------------------------------------------------------------------- a third-party inputs class


@attrs.frozen
class ScoreInputs:
    scores: object
    weights: object
    temperature: float = 1.0


def _score_loss(inputs, params):
    return molting.LossOutput(-torch.nn.functional.logsigmoid(inputs.scores / inputs.temperature) * (inputs.weights + 0.5))


class _ScorePlugin:
    @molting.hookimpl
    def molting_register_stages(self, register):
        register(molting.Stage(name="scores", run=lambda context: {}, description="Scores.", inputs=ScoreInputs))

    @molting.hookimpl
    def molting_register_losses(self, register):
        register(molting.Loss(name="score-loss", compute=_score_loss, stage="scores", needs_reference=False,
                              description="Log-sigmoid of a score."))


class ScoreInputsGenerator(InputsGenerator):
    gradient_fields = ("scores",)
    batch_fields = ("scores", "weights")

    def example(self, batch=6, dtype=None, seed=0, reference=True):  # as docs/conformance.md shows
        g = torch.Generator().manual_seed(seed)
        return ScoreInputs(scores=torch.randn(batch, generator=g).to(dtype or torch.float32),
                           weights=torch.rand(batch, generator=g).to(dtype or torch.float32))

    def zero_margin(self, reference=True):
        inputs = ScoreInputs(scores=torch.zeros(4), weights=torch.ones(4))
        return ZeroMargin(inputs, (Expectation("scores", +1, "the score"),), condition="at a score of 0")


class ScoreInputsWithoutZeroMargin(ScoreInputsGenerator):
    zero_margin = InputsGenerator.zero_margin


@pytest.fixture
def score_host():
    host = load_plugins(disabled=[])
    host.register(_ScorePlugin(), "scores")
    return host


def test_a_loss_of_an_inputs_class_without_a_generator_is_skipped_with_the_reason(score_host):
    results = {r.check: r for r in check_plugin("score-loss", host=score_host, skip_slow=True)}
    for name in NUMERIC_LOSS_CHECKS:
        assert results[name].status == "skipped"
        assert "whose inputs class test_conformance.ScoreInputs has no example-input generator" in results[name].message
        assert "@molting.testing.inputs_generator(ScoreInputs)" in results[name].message
    assert results["description"].status == "passed"


@pytest.mark.parametrize("generator", [ScoreInputsGenerator, ScoreInputsWithoutZeroMargin])
def test_a_registered_generator_gives_a_third_party_inputs_class_the_checks(score_host, monkeypatch, generator):
    monkeypatch.setattr(testing_inputs, "GENERATORS", dict(testing_inputs.GENERATORS))  # undone after the test
    assert testing_inputs.inputs_generator(ScoreInputs)(generator) is generator
    assert type(generator_for(ScoreInputs)) is generator and generator_for(ScoreInputs).inputs_class is ScoreInputs
    results = {r.check: r for r in check_plugin("score-loss", host=score_host, skip_slow=True)}
    for name in NUMERIC_LOSS_CHECKS:
        if name == "gradient-direction" and generator is ScoreInputsWithoutZeroMargin:
            assert results[name].status == "skipped" and "defines no zero-margin case" in results[name].message
        else:
            assert results[name].status == "passed", results[name]


def test_a_wrong_sign_shows_through_a_third_party_generator(score_host, monkeypatch):
    monkeypatch.setattr(testing_inputs, "GENERATORS", dict(testing_inputs.GENERATORS))
    testing_inputs.inputs_generator(ScoreInputs)(ScoreInputsGenerator)
    wrong = molting.Loss(name="score-wrong", stage="scores", needs_reference=False, description="Wrong sign.",
                         compute=lambda inputs, params: molting.LossOutput(torch.nn.functional.logsigmoid(inputs.scores)))
    result = {r.check: r for r in check_plugin(wrong, host=score_host, skip_slow=True)}["gradient-direction"]
    assert result.status == "failed"
    assert result.message == ("at a score of 0, d loss / d scores = [0.5, 0.5, 0.5, 0.5]; expected < 0 so that "
                              "training raises the score.")


def test_a_loss_of_a_stage_that_is_not_installed_is_skipped_with_the_reason():
    lost = molting.Loss(name="lost", compute=_score_loss, stage="no-such-stage", description="Stage missing.")
    results = {r.check: r for r in check_plugin(lost, skip_slow=True)}
    assert results["dtypes"].status == "skipped"
    assert "runs in stage 'no-such-stage', which is not installed" in results["dtypes"].message


# --------------------------------------------------------------------------- two distributions, one name


def test_molting_check_refuses_a_name_two_distributions_provide(tmp_path):
    site = tmp_path / "site"
    make_distribution(site, "molting-hinge-a", "1.0", {"hinge-a": HINGE_LOSS.replace("{name}", "slic")})
    make_distribution(site, "molting-hinge-b", "2.0", {"hinge-b": HINGE_LOSS.replace("{name}", "slic")})
    result = run_molting("check", "slic", "--skip-slow", env={"PYTHONPATH": str(site)})
    assert result.returncode == 1
    assert "checks:" not in result.stdout  # nothing was checked
    assert ("loss 'slic' is provided by both molting-hinge-a 1.0 and molting-hinge-b 2.0 (plugins 'hinge-a', "
            "'hinge-b')") in result.stderr
    # the remedy it names works: with one disabled, the other one is checked
    result = run_molting("check", "slic", "--skip-slow",
                         env={"PYTHONPATH": str(site), "MOLTING_DISABLE_PLUGINS": "hinge-b"})
    assert "provided by both" not in result.stderr
    assert "loss:slic\n" in result.stdout and "PASS  gradient-direction" in result.stdout
    assert "13 checks: 12 passed, 1 failed" in result.stdout  # HINGE_LOSS's beta has no validator


def test_subjects_for_refuses_a_conflicting_component_name(tmp_path, monkeypatch):
    site = tmp_path / "site"
    make_distribution(site, "molting-hinge-a", "1.0", {"hinge-a": HINGE_LOSS.replace("{name}", "slic")})
    make_distribution(site, "molting-hinge-b", "2.0", {"hinge-b": HINGE_LOSS.replace("{name}", "slic")})
    monkeypatch.syspath_prepend(str(site))
    host = load_plugins(disabled=[])
    with pytest.raises(PluginError, match="loss 'slic' is provided by both molting-hinge-a 1.0 and molting-hinge-b 2.0"):
        check_plugin("slic", host=host, skip_slow=True)
    with pytest.raises(PluginError, match="provided by both"):
        check_plugin("slic", kind="loss", host=host, skip_slow=True)
    for plugin in ("hinge-a", "hinge-b"):  # by plugin name too: either would check the first-registered slic
        with pytest.raises(PluginError, match="provided by both"):
            check_plugin(plugin, host=host, skip_slow=True)
