"""From plugin names, a recipe and flags to a resolved :class:`RunConfig` and its :class:`Step` list.

``molting run --plugin dpo`` names a loss (run in its stage) or a stage (run
with its default loss); a recipe may list several steps with their own keys.
This module merges built-in defaults < recipe < flags for each step, calls
the ``molting_configure`` hooks, and builds the hyperparameter objects of
losses and stages. Running the steps is :mod:`molting.pipeline`'s job.
"""

from __future__ import annotations

import math

from typing import Any, Mapping

import attrs

from molting.components import Stage
from molting.config import DEMO_DEFAULTS, DEMO_LOSS_DEFAULTS, RunConfig, build_config, normalise_key
from molting.context import Step
from molting.discovery import PluginHost
from molting.errors import ConfigError, PluginError

__all__ = ["Step", "make_advantage_params", "make_env_params", "make_loss_params", "make_stage_params", "resolve_config",
           "resolve_step", "with_advantage", "with_environment"]


def resolve_step(host: PluginHost, name: str, as_loss: bool = False) -> Step:
    """``--plugin NAME``: a stage (run with its default loss) or a loss (run in its stage).

    A name that is both (``sft``: the SFT stage, and the NLL loss of the
    preference stage) means the stage, unless ``as_loss`` (``--loss sft=1``).
    """
    is_loss = name in host.components["loss"] or ("loss", name) in host.conflicts
    if (name in host.components["stage"] or ("stage", name) in host.conflicts) and not (as_loss and is_loss):
        stage = host.get("stage", name)
        loss = host.get("loss", stage.default_loss) if stage.default_loss else None
        return Step(name, stage, loss, (stage.default_loss,) if loss else ())
    if is_loss:
        loss = host.get("loss", name)
        try:
            stage = host.get("stage", loss.stage)
        except PluginError as exc:
            raise PluginError(f"loss {name!r} runs in stage {loss.stage!r}, which is not available: {exc}") from exc
        return Step(name, stage, loss, (name,))
    hint = host._broken_hint(name)
    raise PluginError(
        f"no loss or stage named {name!r}. {hint}{host.available('loss')}. {host.available('stage')}. "
        "Run `molting plugins` to see every installed plugin."
    )


def resolve_config(
    host: PluginHost,
    plugins: list[str],
    recipe: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    recipe_source: str = "the recipe",
) -> tuple[RunConfig, list[Step]]:
    """Merge built-in defaults < recipe < flags into a :class:`RunConfig` and resolve its steps.

    A recipe may list its steps with their own keys (``stages: [{plugin: sft,
    epochs: 1}, {plugin: dpo, beta: 0.2}]``); each step's config is then the
    defaults < the recipe's top-level keys < the step's keys < the flags, so
    run-wide flags such as ``--max-steps`` apply to every step. Each returned
    step carries its config; the returned config is the run-wide one.
    """
    recipe = dict(recipe or {})
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != {}}
    stage_entries = _stage_entries(recipe.pop("stages", None), recipe_source)
    recipe_plugins = _recipe_plugins(recipe, stage_entries, plugins, recipe_source)
    losses = _loss_weights(flags.get("losses", recipe.get("losses")), recipe_source)
    names = list(plugins) or list(recipe_plugins or []) or list(losses)[:1]
    if not names:
        raise ConfigError("no plugin given: use --plugin NAME (e.g. --plugin dpo) or `plugin:` in the recipe")
    steps = [resolve_step(host, name, as_loss=bool(losses)) for name in names]
    if losses:
        steps = [_combined_step(host, steps, losses)]
    overrides = [keys for _, keys in stage_entries] or [{} for _ in steps]
    steps = _per_step(host, steps, overrides, "advantage", flags.get("advantage", recipe.get("advantage")),
                      lambda stage: stage.default_advantage, with_advantage,
                      "takes an advantage estimator; the online stages grpo and ppo do")
    steps = _per_step(host, steps, overrides, "env", flags.get("env", recipe.get("env")),
                      lambda stage: stage.environments, with_environment,
                      "rolls out episodes; the online stages grpo, ppo and sample-pairs do")
    param_names = tuple(sorted({name for step in steps for name in step.param_names}))
    demo = "model" not in recipe and "model" not in flags

    def defaults(chosen: list[Step]) -> dict[str, Any]:
        return _demo_defaults(host, chosen) if demo else {}

    base = {**defaults(steps), **recipe, "plugins": names}
    build_config(base, param_names, recipe_source)  # name the recipe in its errors
    config = _configured(host, build_config({**base, **flags}, param_names, "the command-line flags"))
    configured = []
    for index, (step, keys) in enumerate(zip(steps, overrides)):
        where = f"{recipe_source}, stage {index + 1} ({step.name})"
        build_config({**defaults([step]), **keys, "plugins": names}, step.param_names, where)
        own_data = {"data": keys["data"]} if "data" in keys else {}  # a step's own data beats the run-wide --data
        values = {**defaults([step]), **recipe, **keys, **flags, **own_data, "plugins": names}
        configured.append(attrs.evolve(step, config=_configured(host, build_config(values, param_names, where)),
                                       own_data=bool(own_data)))
    return config, configured


def _per_step(host: PluginHost, steps: list[Step], overrides: list[Mapping[str, Any]], key: str, run_wide: Any,
              takes: Any, attach: Any, what: str) -> list[Step]:
    """Each step with its ``key`` component (an advantage estimator, an environment): the step's own recipe key,
    else the run's (for the steps whose stage ``takes`` one), attached and checked by ``attach``."""
    takers = [step for step in steps if takes(step.stage)]
    if run_wide is not None and not takers:
        names = ", ".join(step.stage.name for step in steps)
        raise ConfigError(f"--{key} {run_wide}: no stage of this run ({names}) {what}")
    return [attach(host, step, keys.get(key, run_wide if step in takers else None))
            for step, keys in zip(steps, overrides)]


def with_advantage(host: PluginHost, step: Step, name: Any = None) -> Step:
    """``step`` with the advantage estimator ``name`` (None: its stage's default, if it takes one), checked
    against what the stage can give it."""
    stage = step.stage
    if name is None:
        name = stage.default_advantage
        if name is None:
            return step
    elif stage.default_advantage is None:
        raise ConfigError(f"advantage {name!r}: stage {stage.name!r} takes no advantage estimator")
    if not isinstance(name, str):
        raise ConfigError(f"advantage must be the name of an advantage estimator, got {name!r}")
    advantage = host.get("advantage", name)
    if stage.name not in advantage.stages:
        raise ConfigError(
            f"advantage {name!r} runs in {', '.join(advantage.stages)}, not in stage {stage.name!r} (it needs "
            f"{', '.join(advantage.requirements(advantage.params())) or 'nothing'} that this stage does not give); "
            f"{host.available('advantage')}")
    return attrs.evolve(step, advantage=advantage)


def with_environment(host: PluginHost, step: Step, name: Any = None) -> Step:
    """``step`` with the environment ``name`` (None: none), checked against its stage."""
    if name is None:
        return step
    if not isinstance(name, str):
        raise ConfigError(f"env must be the name of an environment, got {name!r}")
    if not step.stage.environments:
        raise ConfigError(f"env {name!r}: stage {step.stage.name!r} does not roll out episodes; grpo, ppo and "
                          "sample-pairs do")
    return attrs.evolve(step, environment=host.get("environment", name))


def _recipe_plugins(recipe: dict[str, Any], stage_entries: list[tuple[str, dict[str, Any]]], plugins: list[str],
                    source: str) -> list[str] | None:
    """The step names a recipe gives (``plugin:``, ``plugins:`` or ``stages:``), checked against ``--plugin``."""
    recipe_plugins = recipe.pop("plugin", None) or recipe.pop("plugins", None)
    if isinstance(recipe_plugins, str):
        recipe_plugins = [recipe_plugins]
    if recipe_plugins is not None and not (
        isinstance(recipe_plugins, list) and all(isinstance(p, str) for p in recipe_plugins)
    ):
        raise ConfigError(f"`plugin` in {source} must be a name or a list of names, got {recipe_plugins!r}")
    if stage_entries and recipe_plugins:
        raise ConfigError(f"{source} gives both `stages` and `plugin`: list the steps once, under `stages`")
    if stage_entries:
        recipe_plugins = [name for name, _ in stage_entries]
        if plugins and list(plugins) != recipe_plugins:
            raise ConfigError(
                f"{source} lists the stages {', '.join(recipe_plugins)}, but --plugin gives "
                f"{', '.join(plugins)}: drop --plugin, or make it the same list"
            )
    return recipe_plugins


def _demo_defaults(host: PluginHost, chosen: list[Step]) -> dict[str, Any]:
    """The settings that suit the built-in demo model, for a run that names no ``--model``."""
    values: dict[str, Any] = dict(DEMO_DEFAULTS)
    if all(_builtin_losses(host, step) for step in chosen):
        names_read = {name for step in chosen for name in step.param_names}
        values.update({k: v for k, v in DEMO_LOSS_DEFAULTS.items() if k in names_read})
    if len(chosen) == 1:
        values.update(chosen[0].stage.demo_defaults)
    return values


def _stage_entries(value: Any, source: str) -> list[tuple[str, dict[str, Any]]]:
    """The ``stages:`` list of a recipe as (plugin name, its own keys)."""
    if value is None:
        return []
    if not isinstance(value, list) or not value:
        raise ConfigError(f"`stages` in {source} must be a list of mappings, each with a `plugin`; got {value!r}")
    entries = []
    for index, entry in enumerate(value):
        if isinstance(entry, str):
            entry = {"plugin": entry}
        if not isinstance(entry, Mapping) or not isinstance(entry.get("plugin"), str):
            raise ConfigError(
                f"`stages` item {index + 1} in {source} must be a mapping with a `plugin` name "
                f"(e.g. {{plugin: sft, epochs: 1}}); got {entry!r}"
            )
        keys = {normalise_key(k): v for k, v in entry.items() if k != "plugin"}
        run_wide = sorted(set(keys) & {"model", "output_dir", "losses", "plugins", "force", "resume"})
        if run_wide:
            raise ConfigError(
                f"`stages` item {index + 1} ({entry['plugin']}) in {source} sets {', '.join(run_wide)}, which apply to the "
                "whole run: set them at the top level of the recipe (each step starts from the previous step's model)"
            )
        entries.append((entry["plugin"], keys))
    return entries


def _configured(host: PluginHost, config: RunConfig) -> RunConfig:
    """``config`` after every ``molting_configure`` hook, each seeing the last one's result."""
    for impl in reversed(host.hook.molting_configure.get_hookimpls()):  # pluggy's call order
        result = impl.function(config=config)
        if result is not None:
            if not isinstance(result, RunConfig):
                raise PluginError(
                    f"the molting_configure hook of plugin {impl.plugin_name!r} returned {type(result).__name__}, "
                    "not a RunConfig"
                )
            config = result
    return config


def _builtin_losses(host: PluginHost, step: Step) -> bool:
    """Whether every loss of ``step`` comes from molting's own distribution."""
    registered = [host.components["loss"].get(name) for name in step.loss_names]
    return all(r is not None and r.plugin.distribution == "molting" for r in registered)


def _loss_weights(value: Any, source: str) -> dict[str, float]:
    if not value:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                 and math.isfinite(w) for w in value.values()):
        raise ConfigError(f"`losses` in {source} must map loss names to finite numeric weights, e.g. "
                          f"{{dpo: 0.8, sft: 1.0}}; got {value!r}")
    return {str(k): float(w) for k, w in value.items()}


def _combined_step(host: PluginHost, steps: list[Step], losses: dict[str, float]) -> Step:
    """The single step whose loss is the weighted sum of ``losses``."""
    from molting.losses import combine

    if len(steps) != 1:
        raise ConfigError("`losses` combines losses within one stage: give a single --plugin with it")
    combined = combine([(host.get("loss", name), weight) for name, weight in losses.items()])
    step = steps[0]
    if not runs_in(host, combined.stage, step.stage):
        raise ConfigError(
            f"the losses {', '.join(losses)} run in stage {combined.stage!r}, not in {step.stage.name!r}"
            + (f" (which hands its losses {step.stage.inputs.__name__})" if step.stage.inputs else "")
        )
    return Step(step.name, step.stage, combined, tuple(losses))


def runs_in(host: PluginHost, loss_stage: str, stage: Stage) -> bool:
    """Whether a loss written for ``loss_stage`` runs in ``stage``: the same stage, or one that hands its
    losses the same inputs class (an online DPO stage runs every loss of the ``preference`` stage)."""
    if loss_stage == stage.name:
        return True
    if stage.inputs is None or loss_stage not in host.components["stage"]:
        return False
    return host.get("stage", loss_stage).inputs is stage.inputs


def make_loss_params(step: Step, config: RunConfig) -> Any:
    if step.loss is None:
        return None
    return _make_params(step.loss.params, config, f"loss {step.loss.name!r}")


def make_stage_params(step: Step, config: RunConfig) -> Any:
    return _make_params(step.stage.params, config, f"stage {step.stage.name!r}")


def make_advantage_params(step: Step, config: RunConfig) -> Any:
    if step.advantage is None:
        return None
    return _make_params(step.advantage.params, config, f"advantage {step.advantage.name!r}")


def make_env_params(step: Step, config: RunConfig) -> Any:
    """The step's environment's ``params`` from ``env_args`` (``None`` without an environment)."""
    environment = step.environment
    if environment is None:
        return None
    args = config.env_args
    if not isinstance(args, Mapping):
        raise ConfigError(f"env_args must be a mapping of settings, got {args!r}")
    try:
        made = environment.params(**{str(k).replace("-", "_"): v for k, v in args.items()})
    except (TypeError, ValueError) as exc:
        valid = ", ".join(f.name for f in attrs.fields(environment.params)) or "none"
        raise ConfigError(f"invalid env_args for environment {environment.name!r}: {exc} (its settings: {valid})"
                          ) from exc
    return made


def _make_params(params: type, config: RunConfig, owner: str) -> Any:
    fields = {f.name for f in attrs.fields(params)}
    given = {k: v for k, v in config.loss_params.items() if k in fields}
    try:
        made = params(**given)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid hyperparameters for {owner}: {exc}") from exc
    for field in attrs.fields(params):  # no validator of a plugin's own has to think of inf and nan
        value = getattr(made, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"invalid hyperparameters for {owner}: {field.name} must be a finite number, got {value}")
    return made
