"""Running resolved steps: data, the run record, the lifecycle hooks, evaluation, the model card.

A run is one or more steps (see :mod:`molting.resolve`), each a stage with
(optionally) a loss. What a step produces feeds the steps after it; the
stage does the training, and this module loads its rows, writes the step's
``molting_run.json`` and ``recipe.yaml``, calls the hooks around it, and
evaluates and documents what it wrote.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Mapping

import attrs

import molting
from molting.card import write_model_card
from molting.config import RunConfig
from molting.context import DataSource, StageContext, Step, is_main_process
from molting.data import Rows, hold_out
from molting.discovery import PluginHost
from molting.errors import ConfigError, DataError
from molting.files import now_utc, write_json_atomic, write_text_atomic
from molting.hub import hub_origin
from molting.models import describe_model
from molting.resolve import (make_advantage_params, make_env_params, make_loss_params, make_stage_params,
                             with_advantage)

__all__ = ["load_rows", "run"]


def load_rows(host: PluginHost, step: Step | None, data: str | Path | None, made_from: DataSource | None = None,
              config: RunConfig | None = None) -> tuple[Rows, DataSource]:
    """The training rows for ``step`` (a ``datasets.Dataset`` for files and hub datasets, a list of dicts for a
    registered dataset) and where they came from.

    ``data`` is a file or directory, a registered dataset's name, a hub
    dataset id (in that order), or ``None`` (the stage's default dataset;
    ``step`` may be ``None`` when ``data`` is given).
    ``made_from`` is the source of the data an earlier step produced ``data``
    from: the new source says so, and is demo data when that was. ``config``
    gives the hub subset, the split and the ``columns`` renaming.
    """
    from molting.data import rename_columns

    config = config or RunConfig(plugins=())
    rows, source = _read(host, step, data, made_from, config)
    rows = rename_columns(rows, dict(config.columns), str(source))
    if config.persona_role and data is not None and made_from is None:  # a conversation log: one person's turns
        from molting.conversations import read_persona_rows

        rows = read_persona_rows(rows, config.persona_role, str(source))
        count = len({row["conversation"] for row in rows})
        source = attrs.evolve(source, description=f"{source}: {len(rows)} turns of {config.persona_role!r} in "
                                                  f"{count} conversations")
    return rows, source


def _read(host: PluginHost, step: Step | None, data: str | Path | None, made_from: DataSource | None,
          config: RunConfig) -> tuple[Rows, DataSource]:
    from molting.data import read_data, read_hub_dataset
    from molting.hub import is_hub_id

    split = config.data_split
    if data is None:
        default = default_data(step)
        if default is None:
            raise DataError(f"{f'stage {step.stage.name!r}' if step else 'this'} has no built-in data; give one with "
                            "--data PATH")
        return _dataset_rows(host, default, split)
    path = Path(data)
    if path.exists():
        if made_from is None:
            return read_data(path, split), DataSource(str(data), path=path)
        return read_data(path, split), DataSource(f"{data} (made from {made_from})", path=path, demo=made_from.demo)
    if data in host.components["dataset"]:
        return _dataset_rows(host, str(data), split)
    if is_hub_id(str(data).partition("@")[0]):
        rows, snapshot = read_hub_dataset(str(data), config.data_subset, split)
        where = "".join(f", {k} {v!r}" for k, v in (("subset", config.data_subset), ("split", split)) if v)
        return rows, DataSource(f"hub dataset {hub_origin(snapshot) or data}{where}", path=snapshot)
    raise DataError(
        f"data {data!r} is neither an existing file or directory, a registered dataset, nor a hub dataset id "
        f"(ORG/NAME). {host.available('dataset')}"
    )


def default_data(step: Step | None) -> str | None:
    """The registered dataset a step reads without ``--data``: its environment's, else its stage's."""
    if step is None:
        return None
    if step.environment is not None and step.environment.default_data is not None:
        return step.environment.default_data
    return step.stage.default_data


def _dataset_rows(host: PluginHost, name: str, split: str = "train") -> tuple[list[dict[str, Any]], DataSource]:
    dataset = host.get("dataset", name)
    if split not in dataset.splits:
        raise DataError(f"dataset {name!r} has the splits {', '.join(dataset.splits)}, not {split!r} (--data-split)")
    return dataset.load(split), DataSource(f"dataset {name!r} ({split} split)", dataset=name, demo=dataset.demo)


def run_record(config: RunConfig, step: Step, loss_params: Any, model_path: Path, data: DataSource, host: PluginHost,
               stage_params: Any = None, advantage_params: Any = None) -> dict[str, Any]:
    """The content of a step's ``molting_run.json`` before it runs (``status: running``)."""
    advantage = {"advantage": step.advantage.name, "advantage_params": attrs.asdict(advantage_params)} \
        if step.advantage is not None and advantage_params is not None else {}
    return {
        "molting_version": molting.__version__,
        "plugin": step.name,
        "stage": step.stage.name,
        "produces": step.stage.produces,
        "loss": step.loss.name if step.loss else None,
        "loss_params": attrs.asdict(loss_params) if loss_params is not None else {},
        "stage_params": attrs.asdict(stage_params) if stage_params is not None else {},
        **advantage,
        "model": str(model_path),
        "model_hub": _hub_record(model_path),
        "data": data.description,
        "data_hub": _hub_record(data.path) if data.path is not None else None,
        "demo_data": data.demo,
        "config": config.to_dict(),
        "plugins": {
            name: {"distribution": p.distribution, "version": p.version, "status": p.status}
            for name, p in sorted(host.plugins.items())
        },
        "status": "running",
        **_process(),
    }


def _process() -> dict[str, Any]:
    """Who writes a running record: ``pid`` and ``host``, when it started, and its ``heartbeat``
    (:class:`molting.training.Heartbeat` keeps it fresh while the run trains)."""
    import os
    import socket

    started = now_utc()
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "heartbeat": started}


def _hub_record(path: Path) -> dict[str, str] | None:
    """``{"id", "revision"}`` (the resolved commit) of a model or dataset that is a hub snapshot, else ``None``."""
    origin = hub_origin(path)
    return None if origin is None else {"id": origin.repo_id, "revision": origin.commit}


@attrs.frozen
class _Planned:
    """One step, ready to run or to skip."""

    context: StageContext
    data_path: str | Path | None  # None: the stage's own default dataset
    record: dict[str, Any]


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

    artifacts: dict[str, Path] = {"policy": resolve_model_path(config.model, config.model_revision,
                                                               trust_remote_code=config.trust_remote_code)}
    made: DataSource | None = None  # the source of the dataset the step before made
    rerun = False  # once a step runs, the steps after it run too: their inputs may have changed
    results = []
    for index, step in enumerate(steps):
        planned = _plan(config, steps, index, host, artifacts, made)
        context = planned.context
        done = None if len(steps) == 1 or context.config.force or rerun else _completed(context.output_dir, planned.record)
        if done is not None:
            print(f"molting: {step.name}: already complete in {context.output_dir}, skipped (--force reruns it)",
                  file=sys.stderr)
            results.append(done)
        else:
            rerun = True
            results.append(_run_step(planned, claim_dir=len(steps) == 1))
        produced = step.stage.produces
        artifacts[produced] = context.output_dir / "data.jsonl" if produced == "dataset" else context.output_dir
        made = context.data if produced == "dataset" else None
    return results


def _plan(config: RunConfig, steps: list[Step], index: int, host: PluginHost, artifacts: Mapping[str, Path],
          made: DataSource | None) -> _Planned:
    """Step ``index``'s context (settings, rows, output dir) and its run record."""
    step = steps[index]
    step_config = step.config or config
    output_dir = Path(config.output_dir) if len(steps) == 1 else Path(config.output_dir) / f"{index + 1}-{step.name}"
    # the run-wide --data is the first step's; a later step reads its own `data:`, else the dataset the step
    # before it made, else its stage's default
    own = step_config.data if step.own_data or step_config.data != config.data else None
    data = step_config.data if index == 0 else own
    produced = artifacts.get("dataset") if made is not None else None
    data_path = data if data is not None else produced
    rows, source = load_rows(host, step, data_path, made_from=made if data is None else None, config=step_config)
    rows, eval_rows, eval_source = _held_out(host, step, rows, source, step_config)
    if step_config.lora_r and not step_config.merge and step.stage.produces == "policy" and index + 1 < len(steps):
        print(f"molting: {step.name}: LoRA step inside a pipeline: its output is merged (as --merge) so the next "
              "step starts from its full weights", file=sys.stderr)
        step_config = attrs.evolve(step_config, merge=True)
    if step.advantage is None:  # a Step built by hand, not by resolve_config
        step = with_advantage(host, step)
    loss_params, stage_params = make_loss_params(step, step_config), make_stage_params(step, step_config)
    model_path = artifacts["policy"]
    if step_config.dtype == "auto":  # the dtype the model's config.json names: what the run record then says
        from molting.models import config_dtype

        step_config = attrs.evolve(step_config, dtype=config_dtype(model_path))
    context = StageContext(step_config, step, loss_params, model_path, rows, source, output_dir, host,
                           stage_params=stage_params, artifacts=dict(artifacts), eval_rows=eval_rows,
                           eval_data=eval_source, advantage_params=make_advantage_params(step, step_config),
                           env_params=make_env_params(step, step_config))
    record = run_record(step_config, step, loss_params, model_path, source, host, stage_params,
                        context.advantage_params)
    record["data_fingerprint"] = _fingerprint(data_path)
    if eval_source is not None:
        record["eval_data"] = {"source": eval_source.description, "rows": len(eval_rows),
                               **({"fraction": step_config.eval_split, "seed": step_config.seed}
                                  if step_config.eval_split else {"fingerprint": _fingerprint(step_config.eval_data)})}
    return _Planned(context, data_path, record)


def _held_out(host: PluginHost, step: Step, rows: Rows, source: DataSource,
              config: RunConfig) -> tuple[Rows, Rows | None, DataSource | None]:
    """The rows to train on, the held-out rows (``--eval-data``, or ``--eval-split`` of ``rows``) and their source."""
    if config.eval_data and config.eval_split:
        raise ConfigError("give --eval-data (held-out data of its own) or --eval-split (a fraction of --data), not both")
    if config.eval_split:
        train, held = hold_out(rows, config.eval_split, config.seed, str(source))
        return train, held, attrs.evolve(source, description=f"{source}, {len(held)} rows held out (--eval-split "
                                                             f"{config.eval_split:g}, seed {config.seed})")
    if config.eval_data:
        split = attrs.evolve(config, data_split=config.eval_data_split or config.data_split)
        held, held_source = load_rows(host, step, config.eval_data, config=split)
        return rows, held, held_source
    if config.keep_best or config.eval_steps or config.eval_judges:
        raise ConfigError("--eval-steps, --eval-judge and --keep-best evaluate on held-out data: give --eval-data "
                          "or --eval-split")
    return rows, None, None


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
    same = ("plugin", "stage", "loss", "loss_params", "stage_params", "advantage", "advantage_params", "model", "data",
            "data_fingerprint")
    ignored = ("force", "resume", "overwrite", "num_proc")
    settings = {k: v for k, v in record["config"].items() if k not in ignored}
    before = {k: v for k, v in previous.get("config", {}).items() if k not in ignored}
    if any(previous.get(k) != json.loads(json.dumps(record.get(k), default=str)) for k in same):
        return None
    if before != json.loads(json.dumps(settings, default=str)):
        return None
    return previous.get("metrics", {})


def _run_step(planned: _Planned, claim_dir: bool = True) -> dict[str, Any]:
    """Write the step's record and recipe, run its stage between the hooks, then evaluate and document it.

    A run's output directory is claimed first (:func:`molting.rundir.claim`);
    a pipeline's step directories are the pipeline's, which skips or reruns
    them itself.
    """
    from molting.rundir import check_directory, claim, lock

    context, record = planned.context, planned.record
    config, output_dir = context.config, context.output_dir
    main = is_main_process()  # the other processes of a multi-process run write into the directory it claims
    if claim_dir and main:
        claim(output_dir, record, resume=config.resume is not None, overwrite=config.overwrite)
    else:
        check_directory(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with lock(output_dir) if main else contextlib.nullcontext():
        return _run_claimed(planned)


def _run_claimed(planned: _Planned) -> dict[str, Any]:
    context, record = planned.context, planned.record
    step, config, output_dir, host = context.step, context.config, context.output_dir, context.host
    if not config.resume:
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    if is_main_process():
        from molting.rundir import clear_staging

        clear_staging(output_dir)
    write_json_atomic(output_dir / "molting_run.json", record)
    _write_recipe(planned)
    print(
        f"molting: {step.name}: stage {step.stage.name}"
        + (f", loss {step.loss.name}" if step.loss else "")
        + f", model {describe_model(context.model_path)}, data {context.data} ({len(context.rows)} rows) -> {output_dir}",
        file=sys.stderr,
    )
    from molting.logps import logits_chunk_size

    # every log-prob of the stage and of its evaluation; the run is complete once its evaluation and its model card
    # are written too: a kill before then leaves the record "running"
    with logits_chunk_size(config.logits_chunk_size), _failure_recorded(record, output_dir / "molting_run.json"):
        host.hook.molting_before_stage(stage=step.stage, config=config)
        metrics = record["metrics"] = dict(step.stage.run(context))
        for key in ("best", "watch"):  # what molting.watch kept: the best evaluation, the reward-hacking watch
            value = metrics.pop(key, None)
            if value is not None:
                record[key] = value
        if context.eval_rows is not None and "watch" not in record and not any(k.startswith("eval_") for k in metrics):
            print(f"molting: warning: stage {step.stage.name!r} does not evaluate during training: the held-out "
                  f"{context.eval_data} went unused", file=sys.stderr)
        if _should_evaluate(context):
            record["eval"] = _evaluate(context.model_path, output_dir, config)
        held_out_episodes = _episode_rows(context)
        if held_out_episodes is not None:
            record["eval_episodes"] = _evaluate_episodes(context, *held_out_episodes)
        record.update(status="completed", heartbeat=now_utc())
        write_model_card(output_dir, record)
    write_json_atomic(output_dir / "molting_run.json", record)
    host.hook.molting_after_stage(stage=step.stage, config=config, output_dir=str(output_dir), metrics=metrics)
    return metrics


@contextlib.contextmanager
def _failure_recorded(record: dict[str, Any], path: Path) -> Any:
    """On an exception, ``record`` marked ``failed`` (``interrupted`` on Ctrl-C) with the error, written to ``path``."""
    try:
        yield
    except BaseException as exc:
        record.update(status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                      error=f"{type(exc).__name__}: {exc}")
        write_json_atomic(path, record)
        raise


def _write_recipe(planned: _Planned) -> None:
    """``recipe.yaml``: this step as a recipe that reruns it alone (``molting run --config``)."""
    import yaml

    context = planned.context
    config, step = context.config, context.step
    recipe = _recipe(config, step, context.loss_params, context.stage_params)
    if context.output_dir != Path(config.output_dir):  # a pipeline's step: its recipe reruns this step alone, as it ran
        recipe.update(model=str(context.model_path), output_dir=str(context.output_dir), data=str(planned.data_path))
        if planned.data_path is None:
            recipe.pop("data")  # the stage's default dataset
    judge_args = _judge_args_with_artifacts(context)
    if judge_args:
        recipe["judge_args"] = judge_args
    write_text_atomic(context.output_dir / "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))


def _judge_args_with_artifacts(context: StageContext) -> dict[str, Any]:
    """The judges' settings, with what they read from earlier steps filled in (so the recipe reruns alone)."""
    from molting.judging import with_artifacts

    config, stage, host = context.config, context.stage, context.host
    judge_args = dict(config.judge_args or {})
    if not stage.default_judges or not context.artifacts:
        return judge_args
    for name in config.judges or stage.default_judges:
        if name in host.names("judge") and isinstance(judge_args.get(name) or {}, Mapping):
            filled = with_artifacts(host.get("judge", name), judge_args.get(name) or {}, context.artifacts)
            if filled:
                judge_args[name] = filled
    return judge_args


def _should_evaluate(context: StageContext) -> bool:
    """``eval: auto`` evaluates runs on the built-in demo data whose output is a causal LM."""
    config, output_dir = context.config, context.output_dir
    if config.eval == "off" or not is_main_process():
        return False
    if (output_dir / "config.json").exists():
        produced = json.loads((output_dir / "config.json").read_text()).get("architectures") or [""]
        causal = produced[0].endswith("ForCausalLM")
    else:
        causal = (output_dir / "adapter_config.json").exists()  # a LoRA adapter of the (causal) starting model
    return causal and (config.eval == "on" or context.data.demo)


def _evaluate(model_path: Path, output_dir: Path, config: RunConfig) -> dict[str, dict[str, float]]:
    from molting.evaluation import before_after, format_table

    print("molting: evaluating the starting and the trained model on the held-out demo split...", file=sys.stderr)
    from molting.evaluation import SAMPLES_FILE

    result = before_after(model_path, output_dir, seed=config.seed, trust_remote_code=config.trust_remote_code,
                          samples=output_dir / SAMPLES_FILE)
    print(format_table(result), file=sys.stderr)
    return result


def _episode_rows(context: StageContext) -> tuple[list[dict[str, Any]], str] | None:
    """The held-out rows a run with an environment evaluates episodes on before and after: the ``test`` split of
    the environment's default data, when the run trained on that data (``eval: auto``) or ``eval: on``."""
    environment, config = context.environment, context.config
    if environment is None or environment.default_data is None or config.eval == "off" or not is_main_process():
        return None
    dataset = context.host.get("dataset", environment.default_data)
    if "test" not in dataset.splits or (config.eval == "auto" and context.data.dataset != dataset.name):
        return None
    return dataset.load("test"), f"dataset {dataset.name!r} (test split)"


def _evaluate_episodes(context: StageContext, rows: list[dict[str, Any]], source: str) -> dict[str, Any]:
    """Greedy episodes of the starting and the trained model on ``rows``: their figures, printed side by side."""
    from molting.environments import evaluate_episodes, format_episode_table, episode_runner, transcript
    from molting.evaluation import SAMPLES_FILE, load_for_eval, write_samples

    print(f"molting: evaluating the starting and the trained model on {len(rows)} held-out episodes of "
          f"{context.environment.name!r} ({source}), greedy...", file=sys.stderr)
    columns, episodes = {}, {}
    for label, path in (("before", context.model_path), ("after", context.output_dir)):
        model, tokenizer = load_for_eval(path, context.config.trust_remote_code)
        runner = episode_runner(context, tokenizer, _turn_tokens(context))
        columns[label], episodes[label] = evaluate_episodes(model, tokenizer, runner, rows, seed=context.config.seed)
    print(format_episode_table(columns), file=sys.stderr)
    before, after = episodes["before"].episodes, episodes["after"].episodes
    write_samples(context.output_dir / SAMPLES_FILE, [
        {"prompt": str(b.prompt[-1].get("content", "")), "before": transcript(b), "after": transcript(a),
         "before_score": b.reward, "after_score": a.reward} for b, a in list(zip(before, after))[:32]])
    return {"environment": context.environment.name, "source": source, "rows": len(rows), **columns}


def _turn_tokens(context: StageContext) -> int:
    """The longest model turn of the step's episodes: its stage's ``max_new_tokens``."""
    return getattr(context.stage_params, "max_new_tokens", 256)


def _recipe(config: RunConfig, step: Step, loss_params: Any, stage_params: Any = None) -> dict[str, Any]:
    """A YAML recipe that reproduces this step: ``molting run --config recipe.yaml``."""
    data = config.to_dict()
    data.pop("loss_params")
    data.pop("plugins")
    data.pop("force")
    params = {**(attrs.asdict(stage_params) if stage_params is not None else {}),
              **(attrs.asdict(loss_params) if loss_params is not None else {})}
    return {"plugin": step.name, **{k: v for k, v in data.items() if v is not None}, **params}
