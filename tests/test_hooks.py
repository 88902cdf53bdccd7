"""Every hook spec, exercised by a real plugin, and called by every stage it applies to.

In the style of datasette's plugin tests: one ``test_hook_<name>`` per hook
(``test_every_hook_has_a_test`` fails when a hook is added without one), and
the lifecycle hooks watched through a recording plugin while each built-in
stage runs two steps.
"""

from __future__ import annotations

import inspect
import json

import attrs
import pytest

import molting
from molting import hookspecs
from molting.cli import cli, main
from molting.discovery import load_plugins
from molting.pipeline import run
from molting.resolve import resolve_config
from plugin_dists import make_distribution

HOOKS = sorted(name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "molting_spec"))


class Recorder:
    """A library that watches and tweaks a run through the lifecycle hooks."""

    def __init__(self):
        self.calls = []
        self.logs = []
        self.events = []

    @molting.hookimpl
    def molting_configure(self, config):
        self.calls.append("configure")
        return attrs.evolve(config, seed=1234)

    @molting.hookimpl
    def molting_before_stage(self, stage, config):
        self.calls.append(("before", stage.name, config.seed))

    @molting.hookimpl
    def molting_after_stage(self, stage, config, output_dir, metrics):
        self.calls.append(("after", stage.name, output_dir, bool(metrics)))

    @molting.hookimpl
    def molting_on_log(self, metrics, step):
        self.logs.append((step, dict(metrics)))

    @molting.hookimpl
    def molting_trainer_callbacks(self, stage, config):
        from transformers import TrainerCallback

        recorder = self

        class Events(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                recorder.events.append("train_begin")

            def on_step_end(self, args, state, control, **kwargs):
                recorder.events.append(("step_end", state.global_step))

            def on_log(self, args, state, control, logs=None, **kwargs):
                recorder.events.append("log")

            def on_train_end(self, args, state, control, **kwargs):
                recorder.events.append("train_end")

        return [Events()]


# Each built-in stage, two steps on eight rows of its demo data (read from a file, so no demo evaluation runs).
STAGE_RUNS = {
    "preference": ("dpo", {"batch_size": 4}),
    "unpaired": ("kto", {"batch_size": 4}),
    "sft": ("sft", {"batch_size": 4}),
    "reward-model": ("reward-model", {"batch_size": 4}),
    "grpo": ("grpo", {"batch_size": 8, "judges": {"demo-rule": 1.0}, "num_generations": 4, "max_new_tokens": 6}),
    "ppo": ("ppo", {"batch_size": 4, "judges": {"demo-rule": 1.0}, "max_new_tokens": 6}),
    "sample-pairs": ("sample-pairs", {"judges": {"demo-rule": 1.0}, "max_new_tokens": 20, "num_samples": 4,
                                      "generation_batch_size": 16}),
}


@pytest.fixture(scope="module", params=sorted(STAGE_RUNS))
def stage_run(request, tmp_path_factory):
    stage_name = request.param
    plugin, flags = STAGE_RUNS[stage_name]
    host = load_plugins(disabled=[])
    recorder = Recorder()
    host.register(recorder, "recorder")
    work = tmp_path_factory.mktemp(f"hooks-{stage_name}")
    rows = host.get("dataset", host.get("stage", stage_name).default_data).load("train")[:8]
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"max_steps": 2, "logging_steps": 1, "eval": "off", "output_dir": str(work / "out"),
                "data": str(work / "data.jsonl"), **flags}
    config, steps = resolve_config(host, [plugin], flags=settings)
    run(config, steps, host)
    return stage_name, recorder, work / "out", host


def test_every_hook_has_a_test():
    tests = {name for name in globals() if name.startswith("test_hook_")}
    missing = [hook for hook in HOOKS if f"test_hook_{hook}" not in tests]
    assert not missing, f"hooks without a test_hook_<name> in tests/test_hooks.py: {missing}"


# --------------------------------------------------------------------------- lifecycle hooks, in every stage


def test_hook_molting_configure(stage_run):
    stage, recorder, out, _ = stage_run
    assert recorder.calls[0] == "configure"
    assert json.loads((out / "molting_run.json").read_text())["config"]["seed"] == 1234


def test_hook_molting_before_stage(stage_run):
    stage, recorder, _, _ = stage_run
    assert ("before", stage, 1234) in recorder.calls


def test_hook_molting_after_stage(stage_run):
    stage, recorder, out, _ = stage_run
    before, after = ("before", stage, 1234), ("after", stage, str(out), True)
    assert after in recorder.calls and recorder.calls.index(before) < recorder.calls.index(after)


def test_hook_molting_on_log(stage_run):
    stage, recorder, out, _ = stage_run
    declared = set(load_plugins(disabled=[]).get("stage", stage).metrics)
    logged = set().union(*(metrics for _, metrics in recorder.logs))
    assert recorder.logs and declared <= logged, f"{stage} never logged {sorted(declared - logged)}"
    written = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in written] == recorder.logs


def test_hook_molting_trainer_callbacks(stage_run):
    stage, recorder, _, _ = stage_run
    steps = [event[1] for event in recorder.events if isinstance(event, tuple)]
    assert recorder.events[0] == "train_begin" and recorder.events[-1] == "train_end", recorder.events
    assert "log" in recorder.events
    assert steps == list(range(1, len(steps) + 1)) and steps, f"{stage}: step ends {steps}"


def test_the_registered_plugin_is_listed_with_its_hooks(stage_run):
    _, _, _, host = stage_run
    assert host.plugins["recorder"].hooks == sorted([
        "molting_after_stage", "molting_before_stage", "molting_configure", "molting_on_log",
        "molting_trainer_callbacks",
    ])


# --------------------------------------------------------------------------- the others


COMMAND_PLUGIN = """
    import click
    import molting

    @molting.hookimpl
    def molting_register_commands(cli):
        @cli.command()
        @click.argument("who")
        def hello(who):
            '''Say hello (added by a plugin).'''
            click.echo(f"hello {who}")
"""


def test_hook_molting_register_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(make_distribution(tmp_path / "site", "molting-hello", "1.0", {"hello": COMMAND_PLUGIN})))
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["hello", "world"])
        assert exit_info.value.code == 0
        assert "hello world" in capsys.readouterr().out
    finally:
        cli.commands.pop("hello", None)


class AddsSpecs:
    class Specs:
        @hookspecs.hookspec
        def molting_example_score(self, text: str) -> int:
            """A hook of a plugin's own."""

    @molting.hookimpl
    def molting_add_hookspecs(self, pluginmanager):
        pluginmanager.add_hookspecs(self.Specs)


class ImplementsSpecs:
    @molting.hookimpl
    def molting_example_score(self, text):
        return len(text)


def test_hook_molting_add_hookspecs():
    host = load_plugins(disabled=[])
    host.register(ImplementsSpecs(), "implements")  # registered first: validated once the spec arrives
    host.register(AddsSpecs(), "adds")
    host.check_pending()  # a hook another plugin adds is a real hook
    assert host.plugins["implements"].status == "ok"
    assert host.hook.molting_example_score(text="four") == [4]


class JudgePlugin:
    @molting.hookimpl
    def molting_register_judges(self, register):
        register(molting.Judge(name="length", score=lambda prompts, completions, params: [float(len(c)) for c in completions],
                               description="Longer is better."))


class StagePlugin:
    @molting.hookimpl
    def molting_register_stages(self, register):
        register(molting.Stage(name="noop", run=lambda context: {}, description="Does nothing."))


class DatasetPlugin:
    @molting.hookimpl
    def molting_register_datasets(self, register):
        register(molting.Dataset(name="two-rows", load=lambda split: [{"x": 1}, {"x": 2}], description="Two rows."))


class LossPlugin:
    @molting.hookimpl
    def molting_register_losses(self, register):
        register(molting.Loss(name="zero", compute=lambda inputs, params: None, description="Nothing."))


class AdvantagePlugin:
    @molting.hookimpl
    def molting_register_advantages(self, register):
        register(molting.Advantage(name="raw", compute=lambda inputs, params: molting.AdvantageOutput(inputs.rewards),
                                   description="The reward itself."))


class SamplerPlugin:
    @molting.hookimpl
    def molting_register_samplers(self, register):
        from molting.sampling import hf_sample

        register(molting.Sampler(name="plain", sample=hf_sample, description="The hf sampler under another name."))


def _registers(plugin, kind, name):
    host = load_plugins(disabled=[])
    info = host.register(plugin, "extra")
    assert info.components == [f"{kind}:{name}"] and host.lookup(kind, name).plugin is info


def test_hook_molting_register_judges():
    _registers(JudgePlugin(), "judge", "length")


def test_hook_molting_register_stages():
    _registers(StagePlugin(), "stage", "noop")


def test_hook_molting_register_datasets():
    _registers(DatasetPlugin(), "dataset", "two-rows")


def test_hook_molting_register_losses():
    _registers(LossPlugin(), "loss", "zero")


def test_hook_molting_register_advantages():
    _registers(AdvantagePlugin(), "advantage", "raw")


def test_hook_molting_register_samplers():
    _registers(SamplerPlugin(), "sampler", "plain")


class EnvironmentPlugin:
    @molting.hookimpl
    def molting_register_environments(self, register):
        from molting.environments import Episode, Turn

        class Echo(Episode):
            def step(self, turn):
                return Turn(reward=float(len(turn.text)), done=True)

        register(molting.Environment(name="echo", start=lambda row, seed, params: Echo(), description="One turn."))


class ToolParserPlugin:
    @molting.hookimpl
    def molting_register_tool_parsers(self, register):
        from molting.tools import ParsedTurn

        register(molting.ToolParser(name="never", parse=lambda text: ParsedTurn(text.strip()),
                                    render=lambda calls: "", description="Reads no calls at all."))


def test_hook_molting_register_environments():
    _registers(EnvironmentPlugin(), "environment", "echo")


def test_hook_molting_register_tool_parsers():
    _registers(ToolParserPlugin(), "tool_parser", "never")
