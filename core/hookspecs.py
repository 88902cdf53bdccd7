"""The hook contract between molting and its plugins.

Every hook name starts with ``molting_``. A plugin is a module (or object) with
functions marked by :data:`molting.hookimpl`; it is found through the
``molting`` entry-point group, exactly like the built-in plugins.

Two families of hooks exist:

* **registration hooks** (``molting_register_*``) receive a ``register``
  callable and hand it components: stages, losses, judges, datasets,
  advantage estimators, samplers, environments and tool-call parsers. They
  are called once, when the registry is built.
* **lifecycle hooks** let a library extend a run without owning a component:
  see or change the configuration, act before and after each stage, watch the
  metrics, add trainer callbacks or CLI commands, or add hook specs of their
  own.

This module imports nothing heavy: ``molting --help`` must stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    import click

    from molting.components import Advantage, Dataset, Environment, Judge, Loss, Sampler, Stage, ToolParser
    from molting.config import RunConfig

PROJECT_NAME = "molting"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --------------------------------------------------------------------------- registration


@hookspec
def molting_register_stages(register: Callable[[Stage], None]) -> None:
    """Register training stages.

    Called once while the registry is built. Call ``register(stage)`` with a
    :class:`molting.Stage` for each stage the plugin provides. A stage says how
    a phase trains: the data schema it reads, the models it holds and the step.
    The return value is ignored.
    """


@hookspec
def molting_register_losses(register: Callable[[Loss], None]) -> None:
    """Register loss functions.

    Called once while the registry is built. Call ``register(loss)`` with a
    :class:`molting.Loss` for each loss: a pure function of the quantities its
    stage computes, the attrs class of its hyperparameters, and the name of the
    stage it runs in. The return value is ignored.
    """


@hookspec
def molting_register_judges(register: Callable[[Judge], None]) -> None:
    """Register judges, which score completions or pick the better of a pair.

    Called once while the registry is built. Call ``register(judge)`` with a
    :class:`molting.Judge` for each judge. The return value is ignored.
    """


@hookspec
def molting_register_datasets(register: Callable[[Dataset], None]) -> None:
    """Register named data sources.

    Called once while the registry is built. Call ``register(dataset)`` with a
    :class:`molting.Dataset` for each source; ``molting run --data NAME`` then
    loads it. The return value is ignored.
    """


@hookspec
def molting_register_advantages(register: Callable[[Advantage], None]) -> None:
    """Register advantage estimators for the online stages.

    Called once while the registry is built. Call ``register(advantage)``
    with a :class:`molting.Advantage` for each estimator: a pure function of
    a batch's rewards, group ids, masks (and, when it says it needs them,
    values, shaped token rewards, the KL to the reference or greedy
    baselines) that returns the advantages. ``molting run --plugin grpo
    --advantage NAME`` uses it. The return value is ignored.
    """


@hookspec
def molting_register_samplers(register: Callable[[Sampler], None]) -> None:
    """Register samplers: how the online stages (grpo, ppo, sample-pairs) draw completions.

    Called once while the registry is built. Call ``register(sampler)`` with
    a :class:`molting.Sampler` for each: a function of a
    :class:`molting.sampling.SamplingRequest` that returns the completions as
    :class:`molting.sampling.Samples`. ``molting run --sampler NAME`` uses it.
    The return value is ignored.
    """


@hookspec
def molting_register_environments(register: Callable[[Environment], None]) -> None:
    """Register environments: multi-turn episodes the online stages roll out (``--env NAME``).

    Called once while the registry is built. Call ``register(environment)``
    with a :class:`molting.Environment` for each: ``start(row, seed, params)``
    begins an episode from a data row (its first messages and the tools the
    model may call), and the episode's ``step(turn)`` answers each model turn
    with the next observation, a reward and whether it is done.
    ``molting run --plugin grpo --env NAME`` uses it. The return value is ignored.
    """


@hookspec
def molting_register_tool_parsers(register: Callable[[ToolParser], None]) -> None:
    """Register tool-call parsers: how a family of models writes the tool calls an environment runs.

    Called once while the registry is built. Call ``register(parser)`` with a
    :class:`molting.ToolParser` for each format (Hermes/Qwen ``<tool_call>``
    JSON, Llama 3.1 JSON, ...): ``parse(text)`` finds the calls in a model's
    turn and never raises on what the model wrote; ``recognises(template)``
    lets ``--tool-parser auto`` pick it from the model's chat template.
    The return value is ignored.
    """


# --------------------------------------------------------------------------- lifecycle


@hookspec
def molting_configure(config: RunConfig) -> RunConfig | None:
    """See, and optionally change, the resolved configuration of a run.

    Called once per run after defaults, the YAML recipe and the command-line
    flags are merged and before anything is loaded. Return a new
    :class:`molting.RunConfig` (for example ``attrs.evolve(config, seed=1)``)
    to replace it, or ``None`` to leave it as it is. Implementations run in
    pluggy's order, each one seeing the result of the previous ones.
    """


@hookspec
def molting_before_stage(stage: Stage, config: RunConfig) -> None:
    """Called right before ``stage`` starts training, with the run's config.

    Raising here stops the run before the stage loads its model or trains
    (``molting_run.json`` and ``recipe.yaml`` are already written).
    """


@hookspec
def molting_after_stage(stage: Stage, config: RunConfig, output_dir: str, metrics: dict[str, Any]) -> None:
    """Called after ``stage`` finished and saved its model to ``output_dir``.

    ``metrics`` holds the stage's final training metrics (``train_loss``,
    ``train_runtime``, ... and the last logged value of every metric).
    """


@hookspec
def molting_on_log(metrics: dict[str, float], step: int) -> None:
    """Called each time the trainer logs, with the metrics and the global step.

    Called on the main process only. The metric names are the ones written to
    ``metrics.jsonl`` (for a preference stage: ``loss``, ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ...).
    """


@hookspec
def molting_trainer_callbacks(stage: Stage, config: RunConfig) -> list[Any] | None:
    """Return extra ``transformers.TrainerCallback`` objects for ``stage``.

    Called once per stage when its trainer is built. Return a list of
    callbacks (instances or classes), or ``None``. This is the way to reach
    every trainer event: step begin/end, evaluation, checkpoint saves.
    """


@hookspec
def molting_register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``molting`` command line.

    Called once when the CLI starts, with the top-level :class:`click.Group`.
    Use ``@cli.command()`` to add commands. Keep heavy imports inside the
    command function so ``molting --help`` stays fast.
    """


@hookspec(historic=True)
def molting_add_hookspecs(pluginmanager: pluggy.PluginManager) -> None:
    """Add hook specifications of a plugin's own, as pytest's ``pytest_addhooks``.

    Called when the plugin is registered. Call
    ``pluginmanager.add_hookspecs(module_or_class)``; other plugins can then
    implement those hooks and the plugin calls them through
    ``pluginmanager.hook``.
    """
