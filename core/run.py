"""From a resolved config to trained models: the orchestration of ``molting run``.

A run is one or more steps, each a stage with (optionally) a loss. Each
step's output directory is the next step's starting model. The stage does
the training; this module resolves names, loads data, writes the run's
record, and calls the lifecycle hooks around each stage.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import attrs

import molting
from molting.components import Loss, Stage
from molting.config import DEMO_DEFAULTS, DEMO_LOSS_DEFAULTS, RunConfig, build_config
from molting.errors import ConfigError, DataError, PluginError
from molting.card import write_model_card
from molting.discovery import PluginHost


@attrs.frozen
class Step:
    """One stage of a run, with the loss it optimises (``None`` for stages without one).

    ``config`` is the step's own configuration in a pipeline whose recipe
    gives per-stage keys (``stages:``); ``None`` means the run's.
    """

    name: str
    stage: Stage
    loss: Loss | None
    loss_names: tuple[str, ...] = ()  # the registered losses behind ``loss`` (several when combined)
    config: RunConfig | None = None

    @property
    def param_names(self) -> tuple[str, ...]:
        """The hyperparameters this step reads: its loss's and its stage's."""
        classes = [self.stage.params] + ([self.loss.params] if self.loss else [])
        return tuple(sorted({f.name for cls in classes for f in attrs.fields(cls)}))


@attrs.frozen
class StageContext:
    """Everything a stage's ``run`` receives."""

    config: RunConfig
    step: Step
    loss_params: Any
    model_path: Path
    rows: list[dict[str, Any]]
    data_source: str
    output_dir: Path
    host: PluginHost
    stage_params: Any = None
    artifacts: Mapping[str, Path] = attrs.field(factory=dict)
    """The latest output of each kind (``policy``, ``reward-model``, ``dataset``) of the run's earlier steps."""

    @property
    def stage(self) -> Stage:
        return self.step.stage

    @property
    def loss(self) -> Loss | None:
        return self.step.loss

    def callbacks(self) -> list[Any]:
        """Trainer callbacks from the ``molting_trainer_callbacks`` hook, flattened."""
        found: list[Any] = []
        for result in self.host.hook.molting_trainer_callbacks(stage=self.stage, config=self.config):
            found.extend(result or [])
        return found


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
    recipe_plugins = recipe.pop("plugin", None) or recipe.pop("plugins", None)
    if isinstance(recipe_plugins, str):
        recipe_plugins = [recipe_plugins]
    if recipe_plugins is not None and not (
        isinstance(recipe_plugins, list) and all(isinstance(p, str) for p in recipe_plugins)
    ):
        raise ConfigError(f"`plugin` in {recipe_source} must be a name or a list of names, got {recipe_plugins!r}")
    if stage_entries and recipe_plugins:
        raise ConfigError(f"{recipe_source} gives both `stages` and `plugin`: list the steps once, under `stages`")
    if stage_entries:
        recipe_plugins = [name for name, _ in stage_entries]
        if plugins and list(plugins) != recipe_plugins:
            raise ConfigError(
                f"{recipe_source} lists the stages {', '.join(recipe_plugins)}, but --plugin gives "
                f"{', '.join(plugins)}: drop --plugin, or make it the same list"
            )
    losses = _loss_weights(flags.get("losses", recipe.get("losses")), recipe_source)
    names = list(plugins) or list(recipe_plugins or []) or list(losses)[:1]
    if not names:
        raise ConfigError("no plugin given: use --plugin NAME (e.g. --plugin dpo) or `plugin:` in the recipe")
    steps = [resolve_step(host, name, as_loss=bool(losses)) for name in names]
    if losses:
        steps = [_combined_step(host, steps, losses)]
    overrides = [keys for _, keys in stage_entries] or [{} for _ in steps]
    param_names = tuple(sorted({name for step in steps for name in step.param_names}))
    demo = "model" not in recipe and "model" not in flags

    def defaults(chosen: list[Step]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if demo:
            values.update(DEMO_DEFAULTS)
            if all(_builtin_losses(host, step) for step in chosen):
                names_read = {name for step in chosen for name in step.param_names}
                values.update({k: v for k, v in DEMO_LOSS_DEFAULTS.items() if k in names_read})
            if len(chosen) == 1:
                values.update(chosen[0].stage.demo_defaults)
        return values

    base = {**defaults(steps), **recipe, "plugins": names}
    build_config(base, param_names, recipe_source)  # name the recipe in its errors
    config = _configured(host, build_config({**base, **flags}, param_names, "the command-line flags"))
    configured = []
    for index, (step, keys) in enumerate(zip(steps, overrides)):
        where = f"{recipe_source}, stage {index + 1} ({step.name})"
        build_config({**defaults([step]), **keys, "plugins": names}, step.param_names, where)
        own_data = {"data": keys["data"]} if "data" in keys else {}  # a step's own data beats the run-wide --data
        values = {**defaults([step]), **recipe, **keys, **flags, **own_data, "plugins": names}
        configured.append(attrs.evolve(step, config=_configured(host, build_config(values, param_names, where))))
    return config, configured


def _stage_entries(value: Any, source: str) -> list[tuple[str, dict[str, Any]]]:
    """The ``stages:`` list of a recipe as (plugin name, its own keys)."""
    from molting.config import normalise_key

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
    if not isinstance(value, Mapping) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in value.values()):
        raise ConfigError(f"`losses` in {source} must map loss names to numeric weights, e.g. {{dpo: 0.8, sft: 1.0}}; got {value!r}")
    return {str(k): float(w) for k, w in value.items()}


def _combined_step(host: PluginHost, steps: list[Step], losses: dict[str, float]) -> Step:
    """The single step whose loss is the weighted sum of ``losses``."""
    from molting.losses import combine

    if len(steps) != 1:
        raise ConfigError("`losses` combines losses within one stage: give a single --plugin with it")
    combined = combine([(host.get("loss", name), weight) for name, weight in losses.items()])
    step = steps[0]
    if combined.stage != step.stage.name:
        raise ConfigError(f"the losses {', '.join(losses)} run in stage {combined.stage!r}, not in {step.stage.name!r}")
    return Step(step.name, step.stage, combined, tuple(losses))


def make_loss_params(step: Step, config: RunConfig) -> Any:
    if step.loss is None:
        return None
    return _make_params(step.loss.params, config, f"loss {step.loss.name!r}")


def make_stage_params(step: Step, config: RunConfig) -> Any:
    return _make_params(step.stage.params, config, f"stage {step.stage.name!r}")


def _make_params(params: type, config: RunConfig, owner: str) -> Any:
    fields = {f.name for f in attrs.fields(params)}
    given = {k: v for k, v in config.loss_params.items() if k in fields}
    try:
        return params(**given)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid hyperparameters for {owner}: {exc}") from exc


def load_rows(host: PluginHost, step: Step, data: str | Path | None) -> tuple[list[dict[str, Any]], str]:
    """The training rows for ``step`` (a file, a registered dataset, or None: the stage's default) and a
    description of where they came from."""
    from molting.data import read_rows

    if data is None:
        default = step.stage.default_data
        if default is None:
            raise DataError(f"stage {step.stage.name!r} has no built-in data; give one with --data PATH")
        return host.get("dataset", default).load("train"), f"dataset {default!r} (train split)"
    if Path(data).exists():
        return read_rows(data), str(data)
    if data in host.components["dataset"]:
        return host.get("dataset", data).load("train"), f"dataset {data!r} (train split)"
    raise DataError(
        f"data {data!r} is neither an existing file or directory nor a registered dataset. "
        f"{host.available('dataset')}"
    )


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def run_record(config: RunConfig, step: Step, loss_params: Any, model_path: Path, data_source: str, host: PluginHost,
               stage_params: Any = None) -> dict[str, Any]:
    return {
        "molting_version": molting.__version__,
        "plugin": step.name,
        "stage": step.stage.name,
        "produces": step.stage.produces,
        "loss": step.loss.name if step.loss else None,
        "loss_params": attrs.asdict(loss_params) if loss_params is not None else {},
        "stage_params": attrs.asdict(stage_params) if stage_params is not None else {},
        "model": str(model_path),
        "data": data_source,
        "config": config.to_dict(),
        "plugins": {
            name: {"distribution": p.distribution, "version": p.version, "status": p.status}
            for name, p in sorted(host.plugins.items())
        },
        "status": "running",
    }


def run(config: RunConfig, steps: list[Step], host: PluginHost) -> list[dict[str, Any]]:
    """Run every step in order; returns each step's final metrics.

    What a step produces (``Stage.produces``) feeds the steps after it: a
    policy becomes the next step's model, a dataset its data, a reward model
    the default model of the ``reward-model`` judge. In a pipeline a step
    whose output directory already holds a completed run of the same
    settings, model and data is skipped (``--force`` reruns it), so a
    pipeline that failed half way resumes where it stopped.
    """
    from molting.models import resolve_model_path

    output_root = Path(config.output_dir)
    model_path = resolve_model_path(config.model)
    artifacts: dict[str, Path] = {"policy": model_path}
    produced_data: Path | None = None
    previous_source = ""
    rerun = False  # once a step runs, the steps after it run too: their inputs may have changed
    results = []
    for index, step in enumerate(steps):
        step_config = step.config or config
        output_dir = output_root if len(steps) == 1 else output_root / f"{index + 1}-{step.name}"
        loss_params = make_loss_params(step, step_config)
        stage_params = make_stage_params(step, step_config)
        # the run-wide --data is the first step's; a later step reads its own `data:`, else the dataset the step
        # before it made, else its stage's default
        own = step_config.data if step_config.data != config.data else None
        data = step_config.data if index == 0 else own
        data_path = data if data is not None else produced_data  # None: the stage's own default dataset
        rows, source = load_rows(host, step, data_path)
        if produced_data is not None and data is None:
            source += f" (made from {previous_source})"
        previous_source = source
        produced = step.stage.produces
        if step_config.lora_r and not step_config.merge and produced == "policy" and index + 1 < len(steps):
            print(f"molting: {step.name}: LoRA step inside a pipeline: its output is merged (as --merge) so the next "
                  "step starts from its full weights", file=sys.stderr)
            step_config = attrs.evolve(step_config, merge=True)
        record = run_record(step_config, step, loss_params, model_path, source, host, stage_params)
        record["data_fingerprint"] = _fingerprint(data_path)
        done = _completed(output_dir, record) if len(steps) > 1 and not (step_config.force or rerun) else None
        if done is not None:
            print(f"molting: {step.name}: already complete in {output_dir}, skipped (--force reruns it)", file=sys.stderr)
            metrics = done
        else:
            rerun = True
            metrics = _run_step(step, step_config, loss_params, stage_params, model_path, rows, source, data_path,
                                output_dir, host, record, artifacts)
        results.append(metrics)
        artifacts[produced] = output_dir / "data.jsonl" if produced == "dataset" else output_dir
        produced_data = artifacts["dataset"] if produced == "dataset" else None
        if produced == "policy":
            model_path = output_dir
    return results


def _fingerprint(data: str | Path | None) -> list[int] | None:
    """Size and modification time of a data file (or of a saved dataset's files): an edited file is new data."""
    if data is None or not Path(data).exists():
        return None  # a registered dataset: its name and the molting version say what it holds
    files = [Path(data)] if Path(data).is_file() else sorted(f for f in Path(data).rglob("*") if f.is_file())
    return [sum(f.stat().st_size for f in files), max((f.stat().st_mtime_ns for f in files), default=0)]


def _completed(output_dir: Path, record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The metrics of a completed earlier run of the same step in ``output_dir``, or ``None``."""
    try:
        previous = json.loads((output_dir / "molting_run.json").read_text())
    except (OSError, ValueError):
        return None
    if previous.get("status") != "completed":
        return None
    same = ("plugin", "stage", "loss", "loss_params", "stage_params", "model", "data", "data_fingerprint")
    ignored = ("force", "resume")
    settings = {k: v for k, v in record["config"].items() if k not in ignored}
    before = {k: v for k, v in previous.get("config", {}).items() if k not in ignored}
    if any(previous.get(k) != json.loads(json.dumps(record.get(k), default=str)) for k in same):
        return None
    if before != json.loads(json.dumps(settings, default=str)):
        return None
    return previous.get("metrics", {})


def _run_step(step: Step, config: RunConfig, loss_params: Any, stage_params: Any, model_path: Path,
              rows: list[dict[str, Any]], source: str, data_path: str | Path | None, output_dir: Path,
              host: PluginHost, record: dict[str, Any], artifacts: Mapping[str, Path]) -> dict[str, Any]:
    import yaml

    output_dir.mkdir(parents=True, exist_ok=True)
    if not config.resume:
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    write_json_atomic(output_dir / "molting_run.json", record)
    recipe = _recipe(config, step, loss_params, stage_params)
    if output_dir != Path(config.output_dir):  # a pipeline's step: its recipe reruns this step alone, as it ran
        recipe.update(model=str(model_path), output_dir=str(output_dir), data=str(data_path))
        if data_path is None:
            recipe.pop("data")  # the stage's default dataset
    if step.stage.default_judges and artifacts:  # the judges' settings read from earlier steps, so it reruns alone
        from molting.judging import with_artifacts

        judge_args = dict(recipe.get("judge_args") or {})
        for name in config.judges or step.stage.default_judges:
            if name in host.names("judge") and isinstance(judge_args.get(name) or {}, Mapping):
                filled = with_artifacts(host.get("judge", name), judge_args.get(name) or {}, artifacts)
                if filled:
                    judge_args[name] = filled
        if judge_args:
            recipe["judge_args"] = judge_args
    write_text_atomic(output_dir / "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))
    context = StageContext(config, step, loss_params, model_path, rows, source, output_dir, host,
                           stage_params=stage_params, artifacts=dict(artifacts))
    print(
        f"molting: {step.name}: stage {step.stage.name}"
        + (f", loss {step.loss.name}" if step.loss else "")
        + f", model {model_path}, data {source} ({len(rows)} rows) -> {output_dir}",
        file=sys.stderr,
    )
    try:
        host.hook.molting_before_stage(stage=step.stage, config=config)
        metrics = dict(step.stage.run(context))
    except BaseException as exc:
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        write_json_atomic(output_dir / "molting_run.json", record)
        raise
    record.update(status="completed", metrics=metrics)
    write_json_atomic(output_dir / "molting_run.json", record)
    if _should_evaluate(config, source, output_dir):
        record["eval"] = _evaluate(model_path, output_dir, config)
        write_json_atomic(output_dir / "molting_run.json", record)
    write_model_card(output_dir, record)
    host.hook.molting_after_stage(stage=step.stage, config=config, output_dir=str(output_dir), metrics=metrics)
    return metrics


def _should_evaluate(config: RunConfig, source: str, output_dir: Path) -> bool:
    """``eval: auto`` evaluates runs on the built-in demo data whose output is a causal LM."""
    if config.eval == "off" or not _is_main_process():
        return False
    if (output_dir / "config.json").exists():
        produced = json.loads((output_dir / "config.json").read_text()).get("architectures") or [""]
        causal = produced[0].endswith("ForCausalLM")
    else:
        causal = (output_dir / "adapter_config.json").exists()  # a LoRA adapter of the (causal) starting model
    return causal and (config.eval == "on" or "dataset 'demo-" in source)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _evaluate(model_path: Path, output_dir: Path, config: RunConfig) -> dict[str, dict[str, float]]:
    from molting.evaluation import before_after, format_table

    print("molting: evaluating the starting and the trained model on the held-out demo split...", file=sys.stderr)
    result = before_after(model_path, output_dir, seed=config.seed, trust_remote_code=config.trust_remote_code)
    print(format_table(result), file=sys.stderr)
    return result


def _recipe(config: RunConfig, step: Step, loss_params: Any, stage_params: Any = None) -> dict[str, Any]:
    """A YAML recipe that reproduces this step: ``molting run --config recipe.yaml``."""
    data = config.to_dict()
    data.pop("loss_params")
    data.pop("plugins")
    data.pop("force")
    params = {**(attrs.asdict(stage_params) if stage_params is not None else {}),
              **(attrs.asdict(loss_params) if loss_params is not None else {})}
    return {"plugin": step.name, **{k: v for k, v in data.items() if v is not None}, **params}
