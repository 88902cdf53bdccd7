"""Every hook spec, exercised by a plugin that implements it (docs/hooks.md documents each one)."""

from __future__ import annotations

import attrs
import pytest

import molting
from molting import hookspecs
from molting.cli import cli, main
from molting.discovery import load_plugins
from molting.pipeline import run
from molting.resolve import resolve_config
from plugin_dists import make_distribution


class Recorder:
    """A library that watches and tweaks a run through the lifecycle hooks."""

    def __init__(self):
        self.calls = []
        self.logs = []
        self.steps_seen = 0

    @molting.hookimpl
    def molting_configure(self, config):
        self.calls.append("configure")
        return attrs.evolve(config, seed=1234)

    @molting.hookimpl
    def molting_before_stage(self, stage, config):
        self.calls.append(("before", stage.name, config.seed))

    @molting.hookimpl
    def molting_after_stage(self, stage, config, output_dir, metrics):
        self.calls.append(("after", stage.name, output_dir, "train_loss" in metrics))

    @molting.hookimpl
    def molting_on_log(self, metrics, step):
        self.logs.append((step, dict(metrics)))

    @molting.hookimpl
    def molting_trainer_callbacks(self, stage, config):
        from transformers import TrainerCallback

        recorder = self

        class CountSteps(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                recorder.steps_seen += 1

        return [CountSteps()]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory, demo_model):
    host = load_plugins(disabled=[])
    recorder = Recorder()
    host.register(recorder, "recorder")
    out = tmp_path_factory.mktemp("hooks") / "out"
    config, steps = resolve_config(host, ["dpo"], flags={"max_steps": 2, "logging_steps": 1, "output_dir": str(out), "eval": "off"})
    run(config, steps, host)
    return recorder, out, host


def test_configure_can_change_the_config(recorded_run):
    recorder, out, _ = recorded_run
    import json

    assert recorder.calls[0] == "configure"
    assert json.loads((out / "molting_run.json").read_text())["config"]["seed"] == 1234


def test_before_and_after_stage(recorded_run):
    recorder, out, _ = recorded_run
    assert ("before", "preference", 1234) in recorder.calls
    assert ("after", "preference", str(out), True) in recorder.calls
    assert recorder.calls.index(("before", "preference", 1234)) < recorder.calls.index(("after", "preference", str(out), True))


def test_on_log_sees_trl_metric_names_and_steps(recorded_run):
    recorder, _, _ = recorded_run
    steps = [step for step, metrics in recorder.logs if "loss" in metrics]
    assert steps == [1, 2]
    assert "rewards/margins" in recorder.logs[0][1]


def test_trainer_callbacks_are_installed(recorded_run):
    recorder, _, _ = recorded_run
    assert recorder.steps_seen == 2


def test_the_registered_plugin_is_listed_with_its_hooks(recorded_run):
    _, _, host = recorded_run
    assert host.plugins["recorder"].hooks == sorted([
        "molting_after_stage", "molting_before_stage", "molting_configure", "molting_on_log",
        "molting_trainer_callbacks",
    ])


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


def test_register_commands_adds_a_subcommand(tmp_path, monkeypatch, capsys):
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


def test_add_hookspecs_lets_plugins_define_hooks_for_each_other():
    host = load_plugins(disabled=[])
    host.register(ImplementsSpecs(), "implements")  # registered first: validated once the spec arrives
    host.register(AddsSpecs(), "adds")
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


@pytest.mark.parametrize(
    "plugin, kind, name",
    [(JudgePlugin(), "judge", "length"), (StagePlugin(), "stage", "noop"), (DatasetPlugin(), "dataset", "two-rows"),
     (LossPlugin(), "loss", "zero")],
)
def test_register_hooks_add_components(plugin, kind, name):
    host = load_plugins(disabled=[])
    info = host.register(plugin, "extra")
    assert info.components == [f"{kind}:{name}"] and host.lookup(kind, name).plugin is info
