"""molting.judging: resolving judges, the Scorer's cache, and errors that name the judge and the data row."""

from __future__ import annotations

import math
import sys
import textwrap
import time
import uuid

import attrs
import pytest

import molting
from molting.config import RunConfig
from molting.discovery import load_plugins
from molting.errors import ConfigError, JudgeError
from molting.judging import JudgeSpec, Scorer, resolve_judges, text_of
from molting.plugins.python_judge import PythonParams


@pytest.fixture(scope="module")
def host():
    return load_plugins()


@pytest.fixture
def module(tmp_path, monkeypatch):
    """Write a module into a fresh current directory; returns its (unique) name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the judge puts the current directory on it

    def write(source: str) -> str:
        name = f"judges_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


def cfg(**settings) -> RunConfig:
    return RunConfig(plugins=["ppo"], **settings)


def python_spec(host, function: str, **settings) -> JudgeSpec:
    return JudgeSpec("python", host.get("judge", "python"), 1.0, PythonParams(function=function, **settings))


COUNTING = """
    calls = []

    def score(prompts, completions, **columns):
        calls.append(list(completions))
        return [float(len(c)) for c in completions]
"""


# --------------------------------------------------------------------------- the cache


def test_a_second_call_with_the_same_inputs_does_not_call_the_judge(host, module):
    name = module(COUNTING)
    scorer = Scorer([python_spec(host, f"{name}:score")])
    prompts, completions = ["p0", "p1", "p2"], ["a", "bb", "ccc"]
    first = scorer(prompts, completions, {"answer": ["1", "2", "3"]})
    calls = sys.modules[name].calls
    assert first == ([1.0, 2.0, 3.0], {"python": [1.0, 2.0, 3.0]}) and len(calls) == 1
    assert scorer(prompts, completions, {"answer": ["1", "2", "3"]}) == first
    assert len(calls) == 1 and scorer.hits == 3 and scorer.misses == 3
    # one new completion: only it is judged
    assert scorer(prompts, ["a", "bb", "dddd"], {"answer": ["1", "2", "3"]})[0] == [1.0, 2.0, 4.0]
    assert calls[-1] == ["dddd"]


def test_changed_settings_columns_or_prompts_miss_the_cache(host, module):
    name = module(COUNTING)
    scorer = Scorer([python_spec(host, f"{name}:score")])
    scorer(["p"], ["a"], {"answer": ["1"]})
    calls = sys.modules[name].calls
    other = python_spec(host, f"{name}:score", timeout=30.0)  # same judge, other settings
    scorer.score(other, ["p"], ["a"], {"answer": ["1"]})
    assert len(calls) == 2
    scorer(["p"], ["a"], {"answer": ["2"]})  # another reference
    scorer(["q"], ["a"], {"answer": ["1"]})  # another prompt
    assert len(calls) == 4
    scorer(["p"], ["a"], {"answer": ["1"]})
    assert len(calls) == 4


def test_a_completion_repeated_in_one_batch_is_judged_once(host, module):
    name = module(COUNTING)
    scorer = Scorer([python_spec(host, f"{name}:score")])
    totals, _ = scorer(["p", "p", "p"], ["same", "same", "other"])
    assert totals == [4.0, 4.0, 5.0] and sys.modules[name].calls == [["same", "other"]]


def test_message_list_prompts_and_completions_are_cached(host, module):
    name = module(COUNTING)
    scorer = Scorer([python_spec(host, f"{name}:score")])
    prompts = [[{"role": "user", "content": "hi"}]]
    completions = [[{"role": "assistant", "content": "hello"}]]
    assert scorer(prompts, completions)[0] == [1.0]  # len() of a one-message list
    assert scorer(prompts, completions)[0] == [1.0] and len(sys.modules[name].calls) == 1


def test_no_cache_for_cache_false_nondeterministic_judges_or_cache_off(host, module):
    name = module(COUNTING)
    spec = python_spec(host, f"{name}:score", cache=False)
    scorer = Scorer([spec])
    scorer(["p", "p"], ["a", "a"])
    scorer(["p"], ["a"])
    assert sys.modules[name].calls == [["a", "a"], ["a"]]
    varying = attrs.evolve(python_spec(host, f"{name}:score"), judge=attrs.evolve(spec.judge, deterministic=False))
    scorer = Scorer([varying])
    scorer(["p"], ["a"])
    scorer(["p"], ["a"])
    assert len(sys.modules[name].calls) == 4
    off = Scorer([python_spec(host, f"{name}:score")], cache=False)
    off(["p"], ["a"])
    off(["p"], ["a"])
    assert len(sys.modules[name].calls) == 6


def test_weights_combine_judges(host, module):
    name = module(COUNTING)
    rule = JudgeSpec("rule", host.get("judge", "rule"), 2.0, host.get("judge", "rule").params())
    scorer = Scorer([python_spec(host, f"{name}:score"), rule])
    totals, per_judge = scorer(["p", "p"], [" 12", " 13"], {"answer": ["12", "12"]})
    assert per_judge == {"python": [3.0, 3.0], "rule": [1.0, 0.0]} and totals == [5.0, 3.0]


# --------------------------------------------------------------------------- errors name the judge and the row


def test_a_raising_function_names_the_judge_and_the_data_row(host, module):
    name = module("""
        def score(prompts, completions, **columns):
            return [1.0 / (c != "bad") for c in completions]
    """)
    with pytest.raises(JudgeError) as info:
        Scorer([python_spec(host, f"{name}:score")])(["p0", "p1", "p2"], ["ok", "bad", "ok"], rows=[10, 11, 12])
    message = str(info.value)
    assert "judge 'python' raised ZeroDivisionError" in message and "data row 11 ('p1')" in message


def test_a_wrong_count_names_the_judge_and_the_rows(host, module):
    name = module("""
        def score(prompts, completions, **columns):
            return [1.0]
    """)
    with pytest.raises(JudgeError, match=r"judge 'python' returned 1 scores for 3 completions \(the prompts at data "
                                         r"rows 4–6\)"):
        Scorer([python_spec(host, f"{name}:score")])(["a", "b", "c"], ["x", "y", "z"], rows=[4, 5, 6])


@pytest.mark.parametrize("bad", ["float('nan')", "float('inf')", "None", "'1.0'"])
def test_a_nan_or_non_number_names_the_judge_and_the_row(host, module, bad):
    name = module(f"""
        def score(prompts, completions, **columns):
            return [1.0, {bad}, 0.0]
    """)
    with pytest.raises(JudgeError, match=r"judge 'python' returned .* for the prompt at data row 8 \('p1'\); "
                                         r"expected a finite number"):
        Scorer([python_spec(host, f"{name}:score")])(["p0", "p1", "p2"], ["x", "y", "z"], rows=[7, 8, 9])


class BadJudges:
    """A plugin registering judges that raise, miscount and return NaN."""

    @molting.hookimpl
    def molting_register_judges(self, register):
        def raises(prompts, completions, params):
            if any("boom" in c for c in completions):
                raise RuntimeError("cannot judge this")
            return [0.0] * len(completions)

        register(molting.Judge(name="bad-raise", score=raises, description="Raises on 'boom'."))
        register(molting.Judge(name="bad-count", score=lambda p, c, params: [0.0] * (len(c) + 1), description="One too many."))
        register(molting.Judge(name="bad-nan", score=lambda p, c, params: [math.nan if x == "n" else 0.0 for x in c],
                               description="NaN on 'n'."))


@pytest.fixture(scope="module")
def bad_host():
    host = load_plugins()
    host.register(BadJudges(), "bad-judges")
    return host


@pytest.mark.parametrize("judge, message", [
    ("bad-raise", r"judge 'bad-raise' raised RuntimeError: cannot judge this — on the prompt at data row 21 \('q1'\)"),
    ("bad-count", r"judge 'bad-count' returned 4 scores for 3 completions \(the prompts at data rows 20–22\)"),
    ("bad-nan", r"judge 'bad-nan' returned nan for the prompt at data row 22 \('q2'\)"),
])
def test_registered_bad_judges_are_reported_through_the_scorer(bad_host, judge, message):
    config = cfg(judges={judge: 1.0})
    scorer = Scorer(resolve_judges(bad_host, config, {}))
    with pytest.raises(JudgeError, match=message):
        scorer(["q0", "q1", "q2"], ["fine", "boom", "n"], rows=[20, 21, 22])


def test_async_functions_are_awaited(host, module):
    name = module("""
        import asyncio

        async def score(prompts, completions, answer):
            await asyncio.sleep(0)
            return [float(c.strip() == a) for c, a in zip(completions, answer)]
    """)
    scorer = Scorer([python_spec(host, f"{name}:score")])
    assert scorer(["p", "p"], [" 3", " 4"], {"answer": ["3", "3"], "other": [0, 0]})[0] == [1.0, 0.0]
    # the judge's own timeout path and the no-timeout path give the same
    untimed = python_spec(host, f"{name}:score", timeout=0)
    assert Scorer([untimed])(["p", "p"], [" 3", " 4"], {"answer": ["3", "3"]})[0] == [1.0, 0.0]


@pytest.mark.parametrize("source", [
    """
    import time

    def score(prompts, completions, **columns):
        time.sleep(30)
    """,
    """
    import asyncio

    async def score(prompts, completions, **columns):
        await asyncio.sleep(30)
    """,
], ids=["sync", "async"])
def test_a_function_over_its_timeout_is_an_error(host, module, source):
    name = module(source)
    start = time.monotonic()
    with pytest.raises(JudgeError, match=rf"judge 'python' timed out: {name}:score returned no scores within timeout=0.3 s "
                                         r"\(raise it with judge_args: \{python: \{timeout: SECONDS\}\}\) — on the "
                                         r"prompts at data rows 3, 4"):
        Scorer([python_spec(host, f"{name}:score", timeout=0.3)])(["a", "b"], ["x", "y"], rows=[3, 4])
    assert time.monotonic() - start < 5  # not retried prompt by prompt


def test_import_errors_name_the_function(host, module):
    name = module("import not_a_module_anywhere\n")
    with pytest.raises(ConfigError, match=rf"judge 'python' cannot import '{name}:score': ModuleNotFoundError: No module "
                                          r"named 'not_a_module_anywhere' \(looked in the current directory"):
        Scorer([python_spec(host, f"{name}:score")])(["p"], ["c"])
    with pytest.raises(ConfigError, match=r"cannot import 'no_such_module_xyz:f': ModuleNotFoundError"):
        Scorer([python_spec(host, "no_such_module_xyz:f")])(["p"], ["c"])
    other = module("x = 1\n")
    with pytest.raises(ConfigError, match=rf"module '{other}' has no 'score' \(function '{other}:score'\)"):
        Scorer([python_spec(host, f"{other}:score")])(["p"], ["c"])
    with pytest.raises(ConfigError, match=rf"'{other}:x' is a int, not a function"):
        Scorer([python_spec(host, f"{other}:x")])(["p"], ["c"])
    with pytest.raises(ConfigError, match=r"judge 'python' needs the function to call: judge_args: \{python: "
                                          r"\{function: 'module:function'\}\}"):
        Scorer([python_spec(host, None)])(["p"], ["c"])


def test_judge_errors_of_configuration_pass_through_unchanged(host):
    rule = JudgeSpec("rule", host.get("judge", "rule"), 1.0, host.get("judge", "rule").params())
    with pytest.raises(ConfigError, match=r"judge 'rule' \(mode numeric\) compares each completion with the reference "
                                          r"column 'answer', which the data does not have \(its other columns: 'reference'\)"):
        Scorer([rule])(["p"], ["c"], {"reference": ["1"]})


def test_lists_of_different_lengths_are_a_caller_error(host):
    rule = JudgeSpec("rule", host.get("judge", "rule"), 1.0, host.get("judge", "rule").params())
    with pytest.raises(ValueError, match=r"2 prompts but 1 completions, 3 column 'answer'"):
        Scorer([rule])(["p", "q"], ["c"], {"answer": ["1", "2", "3"]})


# --------------------------------------------------------------------------- resolving a run's judges


def test_resolve_judges_reads_weights_and_settings(host):
    config = cfg(judges={"rule": 1.0, "python": 0.5},
                       judge_args={"rule": {"mode": "exact"}, "python": {"function": "m:f", "timeout": 5}})
    specs = resolve_judges(host, config, {"reward-model": 1.0})
    assert [(s.name, s.weight) for s in specs] == [("rule", 1.0), ("python", 0.5)]
    assert specs[0].params.mode == "exact" and specs[1].params == PythonParams(function="m:f", timeout=5)
    assert [s.name for s in resolve_judges(host, cfg(), {"rule": 1.0})] == ["rule"]  # the stage's default


def test_resolve_judges_fills_the_reward_model_of_an_earlier_step(host, tmp_path):
    [spec] = resolve_judges(host, cfg(), {"reward-model": 1.0}, {"reward-model": tmp_path / "2-reward"})
    assert spec.params.model == str(tmp_path / "2-reward")
    given = cfg(judge_args={"reward-model": {"model": "/elsewhere", "batch-size": 4}})
    [spec] = resolve_judges(host, given, {"reward-model": 1.0}, {"reward-model": tmp_path / "2-reward"})
    assert spec.params.model == "/elsewhere" and spec.params.batch_size == 4  # given wins; '-' reads as '_'
    [spec] = resolve_judges(host, cfg(), {"reward-model": 1.0}, {"policy": tmp_path})
    assert spec.params.model is None


def test_resolve_judges_rejects_bad_settings_with_the_valid_ones(host):
    with pytest.raises(ConfigError, match=r"invalid judge_args for judge 'rule': .*unexpected keyword argument "
                                          r"'colum'.* \(its settings: mode, column, pattern, tolerance\)"):
        resolve_judges(host, cfg(judges={"rule": 1.0}, judge_args={"rule": {"colum": "x"}}), {})
    with pytest.raises(ConfigError, match=r"invalid judge_args for judge 'python': judge 'python': setting timeout must "
                                          r"be a number ≥ 0, got 'soon'"):
        resolve_judges(host, cfg(judges={"python": 1.0}, judge_args={"python": {"timeout": "soon"}}), {})
    with pytest.raises(ConfigError, match=r"judge_args gives settings for rule, which the run does not use"):
        resolve_judges(host, cfg(judges={"python": 1.0}, judge_args={"rule": {}}), {})
    with pytest.raises(ConfigError, match=r"none was given: use --judge NAME"):
        resolve_judges(host, cfg(), {})


def test_a_pointwise_scorer_refuses_a_pairwise_judge(host):
    spec = resolve_judges(host, cfg(judges={"llm-pairwise": 1.0}), {})
    with pytest.raises(ConfigError, match=r"judge 'llm-pairwise' is pairwise"):
        Scorer(spec)
    assert Scorer(spec, pairwise=True).names == ["llm-pairwise"]


def test_text_of_reads_messages():
    assert text_of(" 5") == " 5"
    assert text_of([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]) == "a\nb"
    assert text_of(None) == "" and text_of(7) == "7"


def test_data_columns_give_none_where_a_row_lacks_a_column():
    from molting.judging import data_columns

    rows = [{"prompt": "a", "answer": 3, "topic": "x"}, {"prompt": "b", "answer": 5}]
    assert data_columns(rows) == {"answer": [3, 5], "topic": ["x", None]}


# --------------------------------------------------------------------------- judgements a judge could not make

FLAKY = """
    from molting.judging import Failed

    def score(prompts, completions, **columns):
        # a completion whose length is a multiple of 3 'times out'
        return [Failed("no answer within 1 s") if len(c) % 3 == 0 else float(len(c)) for c in completions]
"""


@pytest.mark.parametrize(("on_error", "expected"), [("zero", [1.0, 0.0, 2.0]), ("skip", [1.0, math.nan, 2.0])])
def test_on_error_replaces_failed_judgements(host, module, on_error, expected):
    name = module(FLAKY)
    scorer = Scorer([python_spec(host, f"{name}:score")], on_error=on_error)
    totals, _ = scorer(["p", "q", "r"], ["a", "ccc", "bb"])
    assert [t if not math.isnan(t) else "nan" for t in totals] == [e if not math.isnan(e) else "nan" for e in expected]
    assert scorer.failed == {"python": 1} and scorer.metrics()["judge/python/failed"] == 1
    assert "no answer within 1 s (data row 1)" in scorer.first_failure["python"]
    scorer(["p", "q", "r"], ["a", "ccc", "bb"])
    assert scorer.failed == {"python": 2}  # the failed one was asked again, the others came from the cache


def test_on_error_fail_names_the_judge_the_row_and_the_way_out(host, module):
    name = module(FLAKY)
    with pytest.raises(JudgeError, match=r"judge 'python' could not judge the completion for the prompt at data row "
                                         r"7 \('q'\): no answer within 1 s\. judge_on_error is fail; with skip or "
                                         r"zero \(--judge-on-error\)"):
        Scorer([python_spec(host, f"{name}:score")])(["p", "q"], ["a", "ccc"], rows=[6, 7])
    with pytest.raises(ConfigError, match="judge_on_error must be one of fail, skip, zero"):
        Scorer([], on_error="ignore")


def test_skipped_completions_take_no_part_in_ranking():
    from molting.ranking import best_against_worst

    pair = best_against_worst([1.0, math.nan, 3.0, 0.5], ["a", "b", "c", "d"])
    assert (pair.chosen, pair.rejected, pair.tie) == (2, 3, False)
    assert best_against_worst([math.nan, 2.0, math.nan], ["a", "b", "c"]).tie


def test_fill_skipped_gives_the_group_mean_of_the_judged():
    import torch

    from molting.advantages import fill_skipped

    rewards = torch.tensor([1.0, float("nan"), 3.0, float("nan"), float("nan"), 5.0])
    filled, skipped = fill_skipped(rewards, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert filled.tolist() == [1.0, 2.0, 3.0, 5.0, 5.0, 5.0] and skipped.tolist() == [0, 1, 0, 1, 1, 0]
    alone, _ = fill_skipped(torch.tensor([float("nan"), float("nan")]), torch.tensor([0, 0]))
    assert alone.tolist() == [0.0, 0.0]


def test_grpo_trains_through_skipped_judgements_and_counts_them(tmp_path, module):
    from test_grpo import run_stage

    name = module(FLAKY)
    settings = dict(judges={"python": 1.0}, judge_args={"python": {"function": f"{name}:score"}})
    records = run_stage(tmp_path, judge_on_error="skip", **settings)
    failed = [r["judge/python/failed"] for r in records if "judge/python/failed" in r]
    assert failed and failed[-1] > 0 and all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert all(math.isfinite(r["reward"]) for r in records if "reward" in r)
    (tmp_path / "strict").mkdir()
    with pytest.raises(JudgeError, match="could not judge"):
        run_stage(tmp_path / "strict", **settings)
