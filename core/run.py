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
    """One stage of a run, with the loss it optimises (``None`` for stages without one)."""

    name: str
    stage: Stage
    loss: Loss | None
    loss_names: tuple[str, ...] = ()  # the registered losses behind ``loss`` (several when combined)


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


def resolve_step(host: PluginHost, name: str) -> Step:
    """``--plugin NAME``: a loss (run in its stage) or a stage (run with its default loss)."""
    if name in host.components["loss"] or ("loss", name) in host.conflicts:
        loss = host.get("loss", name)
        try:
            stage = host.get("stage", loss.stage)
        except PluginError as exc:
            raise PluginError(f"loss {name!r} runs in stage {loss.stage!r}, which is not available: {exc}") from exc
        return Step(name, stage, loss, (name,))
    if name in host.components["stage"] or ("stage", name) in host.conflicts:
        stage = host.get("stage", name)
        loss = host.get("loss", stage.default_loss) if stage.default_loss else None
        return Step(name, stage, loss, (stage.default_loss,) if loss else ())
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
    """Merge built-in defaults < recipe < flags into a :class:`RunConfig` and resolve its steps."""
    recipe = dict(recipe or {})
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != {}}
    recipe_plugins = recipe.pop("plugin", None) or recipe.pop("plugins", None)
    if isinstance(recipe_plugins, str):
        recipe_plugins = [recipe_plugins]
    if recipe_plugins is not None and not (
        isinstance(recipe_plugins, list) and all(isinstance(p, str) for p in recipe_plugins)
    ):
        raise ConfigError(f"`plugin` in {recipe_source} must be a name or a list of names, got {recipe_plugins!r}")
    losses = _loss_weights(flags.get("losses", recipe.get("losses")), recipe_source)
    names = list(plugins) or list(recipe_plugins or []) or list(losses)[:1]
    if not names:
        raise ConfigError("no plugin given: use --plugin NAME (e.g. --plugin dpo) or `plugin:` in the recipe")
    steps = [resolve_step(host, name) for name in names]
    if losses:
        steps = [_combined_step(host, steps, losses)]
    param_names = tuple(sorted({f.name for s in steps if s.loss for f in attrs.fields(s.loss.params)}))

    values: dict[str, Any] = {}
    if "model" not in recipe and "model" not in flags:
        values.update(DEMO_DEFAULTS)
        if all(_builtin_losses(host, step) for step in steps):
            values.update({k: v for k, v in DEMO_LOSS_DEFAULTS.items() if k in param_names})
    build_config({**values, **recipe, "plugins": names}, param_names, recipe_source)  # name the recipe in its errors
    config = build_config({**values, **recipe, **flags, "plugins": names}, param_names, "the command-line flags")
    for impl in reversed(host.hook.molting_configure.get_hookimpls()):  # pluggy's call order; each sees the last result
        result = impl.function(config=config)
        if result is not None:
            if not isinstance(result, RunConfig):
                raise PluginError(
                    f"the molting_configure hook of plugin {impl.plugin_name!r} returned {type(result).__name__}, "
                    "not a RunConfig"
                )
            config = result
    return config, steps


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
    fields = {f.name for f in attrs.fields(step.loss.params)}
    given = {k: v for k, v in config.loss_params.items() if k in fields}
    try:
        return step.loss.params(**given)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid hyperparameters for loss {step.loss.name!r}: {exc}") from exc


def load_rows(host: PluginHost, step: Step, data: str | None) -> tuple[list[dict[str, Any]], str]:
    """The training rows for ``step`` and a description of where they came from."""
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


def run_record(config: RunConfig, step: Step, loss_params: Any, model_path: Path, data_source: str, host: PluginHost) -> dict[str, Any]:
    return {
        "molting_version": molting.__version__,
        "plugin": step.name,
        "stage": step.stage.name,
        "loss": step.loss.name if step.loss else None,
        "loss_params": attrs.asdict(loss_params) if loss_params is not None else {},
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
    """Run every step in order; returns each step's final metrics."""
    import yaml

    from molting.models import resolve_model_path

    output_root = Path(config.output_dir)
    model_path = resolve_model_path(config.model)
    results = []
    for index, step in enumerate(steps):
        output_dir = output_root if len(steps) == 1 else output_root / f"{index + 1}-{step.name}"
        loss_params = make_loss_params(step, config)
        rows, source = load_rows(host, step, config.data)
        record = run_record(config, step, loss_params, model_path, source, host)
        output_dir.mkdir(parents=True, exist_ok=True)
        if not config.resume:
            (output_dir / "metrics.jsonl").unlink(missing_ok=True)
        write_json_atomic(output_dir / "molting_run.json", record)
        write_text_atomic(output_dir / "recipe.yaml", yaml.safe_dump(_recipe(config, step, loss_params), sort_keys=False))
        context = StageContext(config, step, loss_params, model_path, rows, source, output_dir, host)
        print(
            f"molting: {step.name}: stage {step.stage.name}"
            + (f", loss {step.loss.name}" if step.loss else "")
            + f", model {model_path}, data {source} ({len(rows)} rows) -> {output_dir}",
            file=sys.stderr,
        )
        host.hook.molting_before_stage(stage=step.stage, config=config)
        try:
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
        results.append(metrics)
        model_path = output_dir
    return results


def _should_evaluate(config: RunConfig, source: str, output_dir: Path) -> bool:
    """``eval: auto`` evaluates runs on the built-in demo data whose output is a causal LM."""
    if config.eval == "off" or not _is_main_process():
        return False
    if (output_dir / "config.json").exists():
        produced = json.loads((output_dir / "config.json").read_text()).get("architectures") or [""]
        causal = produced[0].endswith("ForCausalLM")
    else:
        causal = (output_dir / "adapter_config.json").exists()  # a LoRA adapter of the (causal) starting model
    return causal and (config.eval == "on" or source.startswith("dataset 'demo-"))


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _evaluate(model_path: Path, output_dir: Path, config: RunConfig) -> dict[str, dict[str, float]]:
    from molting.evaluation import before_after, format_table

    print("molting: evaluating the starting and the trained model on the held-out demo split...", file=sys.stderr)
    result = before_after(model_path, output_dir, seed=config.seed, trust_remote_code=config.trust_remote_code)
    print(format_table(result), file=sys.stderr)
    return result


def _recipe(config: RunConfig, step: Step, loss_params: Any) -> dict[str, Any]:
    """A YAML recipe that reproduces this step: ``molting run --config recipe.yaml``."""
    data = config.to_dict()
    data.pop("loss_params")
    data.pop("plugins")
    params = attrs.asdict(loss_params) if loss_params is not None else {}
    return {"plugin": step.name, **{k: v for k, v in data.items() if v is not None}, **params}
