"""What a stage receives: the :class:`StageContext` of one step of a run.

A stage is a function ``run(context: StageContext) -> Mapping[str, Any]``
(see :class:`molting.Stage`). The context holds everything the step was
resolved to — its configuration, its loss and their hyperparameters, the
model it starts from, its rows and where they came from, the output
directory, the plugin host (for the lifecycle hooks) — and the outputs of
the run's earlier steps. ``docs/stages.md`` documents each field and builds
a stage from it step by step.

This module imports nothing heavy: a stage's registration module may import
it at start-up for its type hints.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import attrs

from molting.components import Advantage, Environment, Loss, Stage
from molting.config import RunConfig

if TYPE_CHECKING:  # pragma: no cover - typing only
    from molting.discovery import PluginHost


@attrs.frozen
class Step:
    """One stage of a run, with the loss it optimises (``None`` for stages without one).

    ``config`` is the step's own configuration in a pipeline whose recipe
    gives per-stage keys (``stages:``); ``None`` means the run's.
    """

    name: str
    """What the user asked for: ``--plugin NAME`` (a loss or a stage name)."""
    stage: Stage
    loss: Loss | None
    loss_names: tuple[str, ...] = ()
    """The registered losses behind ``loss`` (several when combined with ``--loss a=w --loss b=w``)."""
    config: RunConfig | None = None
    advantage: Advantage | None = None
    """The advantage estimator of an online stage (``--advantage``, else the stage's ``default_advantage``)."""
    environment: Environment | None = None
    """The environment whose episodes an online stage rolls out (``--env``); ``None``: single answers."""
    own_data: bool = False
    """Whether the recipe gives this step its own ``data:`` (which it reads even when it names the run-wide
    data: a log both the SFT step and the sampling step read)."""

    @property
    def param_names(self) -> tuple[str, ...]:
        """The hyperparameters this step reads: its loss's, its stage's and its advantage estimator's."""
        classes = [self.stage.params] + ([self.loss.params] if self.loss else [])
        classes += [self.advantage.params] if self.advantage else []
        return tuple(sorted({f.name for cls in classes for f in attrs.fields(cls)}))


@attrs.frozen
class DataSource:
    """Where a step's rows came from: for messages (``str(source)``) and for decisions (``demo``)."""

    description: str
    """For messages: a path, or ``dataset 'NAME' (train split)``, plus ``(made from ...)`` for data an earlier
    step produced."""
    path: Path | None = None
    """The file or directory read; ``None`` for a registered dataset."""
    dataset: str | None = None
    """The registered dataset's name, when the rows came from one."""
    demo: bool = False
    """The built-in demo task's data (a :class:`molting.Dataset` with ``demo=True``), or data an earlier step of
    the run made from it: the run is evaluated on the task's held-out split, and stages may use demo settings."""

    def __str__(self) -> str:
        return self.description


@attrs.frozen
class StageContext:
    """Everything a stage's ``run`` receives for one step."""

    config: RunConfig
    """The step's resolved settings: defaults < recipe < the step's own recipe keys < flags, after every
    ``molting_configure`` hook."""
    step: Step
    loss_params: Any
    """An instance of the loss's ``params`` class, built from the config (``None`` without a loss)."""
    model_path: Path
    """The model to start from: the run's ``--model`` (or the built-in demo model), or the policy the step
    before this one produced."""
    rows: Any
    """The step's data, as read (not yet checked against the stage's columns: that is the stage's job, with
    :func:`molting.data.check_columns` and a :class:`molting.DataError` naming the row): a sequence of dict rows
    (:data:`molting.data.Rows`): a ``datasets.Dataset`` for files and hub datasets (memory-mapped; format and
    tokenize it with :func:`molting.tokenization.map_rows`, read it with :func:`molting.data.iter_rows`), a list
    for a registered dataset."""
    data: DataSource
    output_dir: Path
    """Where the stage writes what it ``produces`` (a model, or ``data.jsonl``) and ``metrics.jsonl``."""
    host: PluginHost
    """The plugin host: the hook relay (``host.hook``) and the registry (``host.get("judge", name)``)."""
    stage_params: Any = None
    """An instance of the stage's own ``params`` class (PPO's γ, GRPO's group size), from the config."""
    artifacts: Mapping[str, Path] = attrs.field(factory=dict)
    """The latest output of each kind (``policy``, ``reward-model``, ``dataset``) of the run's earlier steps."""
    eval_rows: Any = None
    """Held-out rows to evaluate on during training (``--eval-data``, or ``--eval-split`` of the data, which
    ``rows`` then lacks), as read, like ``rows``; ``None``: no evaluation during training."""
    eval_data: DataSource | None = None
    """Where ``eval_rows`` came from."""
    advantage_params: Any = None
    """An instance of the advantage estimator's ``params`` class (``None`` for a stage that takes none)."""
    env_params: Any = None
    """An instance of the environment's ``params`` class, from ``env_args`` (``None`` without an environment)."""

    @property
    def stage(self) -> Stage:
        return self.step.stage

    @property
    def loss(self) -> Loss | None:
        return self.step.loss

    @property
    def advantage(self) -> Advantage | None:
        """The step's advantage estimator: call ``advantage.compute(AdvantageInputs(...), advantage_params)``."""
        return self.step.advantage

    @property
    def environment(self) -> Environment | None:
        """The step's environment: roll its episodes out with :func:`molting.environments.episode_runner`."""
        return self.step.environment

    @property
    def data_source(self) -> str:
        """The data's description, for messages (``str(context.data)``)."""
        return self.data.description

    def callbacks(self) -> list[Any]:
        """Trainer callbacks from the ``molting_trainer_callbacks`` hook, flattened."""
        found: list[Any] = []
        for result in self.host.hook.molting_trainer_callbacks(stage=self.stage, config=self.config):
            found.extend(result or [])
        return found

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Append ``metrics`` at ``step`` to ``metrics.jsonl`` and call ``molting_on_log`` (main process only)."""
        if is_main_process():
            log_metrics(self.output_dir / "metrics.jsonl", step, metrics, self.host.hook)


def log_metrics(path: Path, step: int, logs: Mapping[str, Any], hook: Any) -> None:
    """Append ``{"step": step, **logs}`` to metrics.jsonl and call the ``molting_on_log`` hook: every stage's log."""
    import json

    with Path(path).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": step, **logs}) + "\n")
    hook.molting_on_log(metrics=dict(logs), step=step)


def is_main_process() -> bool:
    """Whether this is the first process of the run (``RANK`` 0, or a run of one process)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0
