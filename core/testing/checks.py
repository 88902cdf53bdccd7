"""The conformance checks, one small function each, and :func:`check_plugin` to run them.

A check receives a :class:`Subject` (the component, how it was found, a
scratch directory) and either returns (passed), raises :class:`CheckFailed`
with what is wrong and how to fix it, or raises :class:`CheckSkipped` with a
reason. Checks are registered per kind with :func:`check`; ``kind="any"``
checks run for every component.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import attrs

from molting.components import COMPONENT_TYPES, KINDS, NAME_PATTERN
from molting.discovery import ENTRY_POINT_GROUP, PluginHost, Registered, load_plugins
from molting.errors import PluginError
from molting.hookspecs import hookimpl
from molting.testing.inputs import InputsGenerator, example_inputs, generator_for, with_logps  # noqa: F401 (public)


class CheckFailed(AssertionError):
    """A check found a problem. ``fix`` says what to change."""

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message + (f" Fix: {fix}" if fix else ""))
        self.fix = fix


class CheckSkipped(Exception):
    """A check does not apply to this component; the message says why."""


@attrs.frozen
class Check:
    name: str
    kind: str
    doc: str
    fn: Callable[[Subject], None]
    slow: bool = False  # trains a model


@attrs.frozen
class Subject:
    """What a check looks at."""

    kind: str
    component: Any
    host: PluginHost
    registered: Registered | None = None  # None when checked as an object rather than by name
    workdir: Path | None = None  # scratch space for the checks that train; check_plugin and the test classes set it

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.component.name}"


@attrs.frozen
class CheckResult:
    component: str
    check: str
    status: str  # passed, failed, skipped, xfailed (failed as declared), xpassed (declared but passed)
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("passed", "skipped", "xfailed")


CHECKS: list[Check] = []


def check(kind: str, slow: bool = False) -> Callable[[Callable[[Subject], None]], Callable[[Subject], None]]:
    """Register a check for components of ``kind`` (or ``"any"``); its name is the function's, dashed."""

    def decorate(fn: Callable[[Subject], None]) -> Callable[[Subject], None]:
        name = fn.__name__.removeprefix("check_").replace("_", "-")
        doc = (fn.__doc__ or "").strip().splitlines()[0].replace("``", "")
        CHECKS.append(Check(name, kind, doc, fn, slow))
        return fn

    return decorate


def checks_for(kind: str, skip_slow: bool = False) -> list[Check]:
    return [c for c in CHECKS if c.kind in (kind, "any") and not (skip_slow and c.slow)]


# --------------------------------------------------------------------------- every kind


@check("any")
def check_entry_point(subject: Subject) -> None:
    """The component is reachable through an entry point in the ``molting`` group."""
    import importlib_metadata

    if subject.registered is None:
        raise CheckSkipped("checked as an object, not found by name through the entry points")
    plugin = subject.registered.plugin
    if plugin.distribution is None:
        raise CheckFailed(
            f"{subject.label} was registered by hand (plugin {plugin.name!r}), not through an entry point.",
            f"declare the module under [project.entry-points.{ENTRY_POINT_GROUP}] in your pyproject.toml and reinstall.",
        )
    points = [ep for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == plugin.name]
    if not any(ep.value == plugin.module for ep in points):
        raise CheckFailed(f"no entry point {plugin.name!r} = {plugin.module!r} in group {ENTRY_POINT_GROUP!r}.")


@check("any")
def check_name(subject: Subject) -> None:
    """The name is well formed and no other plugin uses it for the same kind."""
    name = subject.component.name
    if not NAME_PATTERN.match(name):
        raise CheckFailed(f"name {name!r} is not well formed.", "use lower-case letters, digits, '-' or '_'.")
    if (subject.kind, name) in subject.host.conflicts:
        sources = " and ".join(p.source for p in subject.host.conflicts[(subject.kind, name)])
        raise CheckFailed(f"{subject.label} is registered by both {sources}.", "rename one of them.")
    installed = subject.host.components[subject.kind].get(name)
    if subject.registered is None and installed is not None and installed.component is not subject.component:
        raise CheckFailed(
            f"{subject.label} is already provided by {installed.plugin.source}.", "choose a name of your own."
        )


@check("any")
def check_description(subject: Subject) -> None:
    """The description is one line of at most 120 characters (``molting plugins`` shows it)."""
    text = subject.component.description
    if not text.strip() or "\n" in text.strip() or len(text) > 120:
        raise CheckFailed(
            f"description of {subject.label} must be one non-empty line of at most 120 characters "
            f"(got {len(text)} characters).",
            "put longer documentation in the module docstring.",
        )


def _params_class(subject: Subject) -> type:
    params = getattr(subject.component, "params", None)
    if params is None or not attrs.fields(params):
        raise CheckSkipped(f"{subject.label} has no hyperparameters")
    return params


@check("any")
def check_params_defaults_validate(subject: Subject) -> None:
    """The hyperparameters' defaults build a valid instance."""
    params = _params_class(subject)
    try:
        params()
    except Exception as exc:
        raise CheckFailed(f"{params.__name__}() with defaults raised {exc!r}.", "give every field a valid default.")


def _is_numeric(field: attrs.Attribute) -> bool:
    """A number by its default, or an optional number (``float | None = None``, as trl's optional settings)."""
    if isinstance(field.default, bool):
        return False
    if isinstance(field.default, (int, float)):
        return True
    return field.default is None and re.search(r"\b(float|int)\b", str(field.type or "")) is not None


@check("any")
def check_params_reject_bad_values(subject: Subject) -> None:
    """Each numeric hyperparameter (an optional one too) rejects NaN and a string with a message."""
    params = _params_class(subject)
    numeric = [f for f in attrs.fields(params) if _is_numeric(f)]
    if not numeric:
        raise CheckSkipped(f"{params.__name__} has no numeric hyperparameters")
    for field in numeric:
        for bad in (float("nan"), "not-a-number"):
            try:
                params(**{field.name: bad})
            except (ValueError, TypeError) as exc:
                if not str(exc):
                    raise CheckFailed(f"{params.__name__}({field.name}={bad!r}) was rejected without a message.")
            else:
                raise CheckFailed(
                    f"{params.__name__}({field.name}={bad!r}) was accepted.",
                    f"add an attrs validator to {field.name}, e.g. attrs.validators.gt(0).",
                )


@check("any")
def check_params_round_trip(subject: Subject) -> None:
    """The hyperparameters survive a trip through a dict and YAML."""
    import yaml

    params = _params_class(subject)
    original = params()
    again = params(**yaml.safe_load(yaml.safe_dump(attrs.asdict(original))))
    if again != original:
        raise CheckFailed(f"{params.__name__} changed through YAML: {original!r} became {again!r}.")


# --------------------------------------------------------------------------- losses


def _loss_inputs(subject: Subject) -> tuple[Any, InputsGenerator]:
    """The loss and the generator of its stage's inputs class, or :class:`CheckSkipped` saying why there is none."""
    loss = subject.component
    stage_name = loss.stage
    if stage_name not in subject.host.components["stage"] and ("stage", stage_name) not in subject.host.conflicts:
        raise CheckSkipped(
            f"{subject.label} runs in stage {stage_name!r}, which is not installed, so the suite does not know "
            "its inputs class"
        )
    try:
        stage = subject.host.get("stage", stage_name)
    except PluginError as exc:
        raise CheckSkipped(f"{subject.label} runs in stage {stage_name!r}, which is not usable: {exc}") from exc
    inputs_class = getattr(stage, "inputs", None)
    if inputs_class is None:
        raise CheckSkipped(
            f"{subject.label} runs in stage {stage_name!r}, which declares no inputs class (Stage.inputs is None)"
        )
    generator = generator_for(inputs_class)
    if generator is None:
        raise CheckSkipped(
            f"{subject.label} runs in stage {stage_name!r}, whose inputs class "
            f"{inputs_class.__module__}.{inputs_class.__qualname__} has no example-input generator; register one "
            f"with @molting.testing.inputs_generator({inputs_class.__name__}) (docs/conformance.md)"
        )
    return loss, generator


def _compute(loss: Any, inputs: Any):
    return loss.compute(inputs, loss.params())


def _tensor_fields(inputs: Any) -> dict[str, Any]:
    import torch

    return {f.name: getattr(inputs, f.name) for f in attrs.fields(type(inputs))
            if isinstance(getattr(inputs, f.name), torch.Tensor)}


@check("loss")
def check_output_shapes(subject: Subject) -> None:
    """Per-example losses of shape (batch,), floating point, and rewards of the shape the stage expects."""
    loss, generator = _loss_inputs(subject)
    inputs = generator.example(batch=5, reference=loss.needs_reference)
    out = _compute(loss, inputs)
    losses = getattr(out, "losses", None)
    if losses is None or tuple(losses.shape) != (5,):
        raise CheckFailed(
            f"losses has shape {None if losses is None else tuple(losses.shape)} for a batch of 5; expected (5,).",
            "return one loss per example (the stage averages them); do not reduce inside the loss.",
        )
    if not losses.is_floating_point():
        raise CheckFailed(f"losses has dtype {losses.dtype}; expected a floating-point dtype.")
    for name, (shape, note) in generator.reward_shapes(inputs).items():
        value = getattr(out, name)
        if value is not None and tuple(value.shape) != shape:
            raise CheckFailed(f"{name} has shape {tuple(value.shape)}; expected {shape}{note} or None.")


@check("loss")
def check_finite_on_extreme_inputs(subject: Subject) -> None:
    """Losses and gradients stay finite for large log-probs, rewards or advantages, equal values, a batch of 1.

    The cases come from the generator of the loss's inputs class
    (:meth:`molting.testing.InputsGenerator.extreme_cases`).
    """
    import torch

    loss, generator = _loss_inputs(subject)
    for case, example in generator.extreme_cases(reference=loss.needs_reference).items():
        inputs, leaves = generator.with_gradient(example)
        out = _compute(loss, inputs)
        if not torch.isfinite(out.losses).all():
            raise CheckFailed(f"losses are not finite for {case}: {out.losses.tolist()}.",
                              "use log-sigmoid / logsumexp forms instead of log(sigmoid(x)) or exp(x).")
        if not out.losses.requires_grad:
            raise CheckFailed(f"the losses do not depend on {' or '.join(leaves)} (no gradient).")
        out.losses.sum().backward()
        for name, leaf in leaves.items():
            if leaf.grad is not None and not torch.isfinite(leaf.grad).all():
                raise CheckFailed(f"gradients are not finite for {case}: d loss / d {name} = {_show(leaf.grad)}.")


@check("loss")
def check_gradient_direction(subject: Subject) -> None:
    """At zero margin the gradient raises what the data prefers and lowers the rest (e.g. chosen vs rejected).

    The case and the claims come from the generator of the loss's inputs class
    (:meth:`molting.testing.InputsGenerator.zero_margin`): the chosen response
    up and the rejected one down (preference; the chosen and rejected rewards
    for a reward model), a desirable completion up and an undesirable one down
    (unpaired), the tokens of a completion with a positive advantage up, with
    a negative one down and the padding untouched (group).
    """
    import torch

    loss, generator = _loss_inputs(subject)
    case = generator.zero_margin(reference=loss.needs_reference)
    if case is None:
        raise CheckSkipped(f"the generator of {type(generator).__name__} defines no zero-margin case")
    inputs, leaves = generator.with_gradient(case.inputs)
    out = _compute(loss, inputs)
    if not out.losses.requires_grad:
        raise CheckFailed(f"the losses do not depend on {' or '.join(leaves)} (no gradient).")
    out.losses.sum().backward()
    # descending the loss moves each value by -grad: a value to raise needs grad < 0, one to lower grad > 0
    for claim in case.expectations:
        grad = leaves[claim.field].grad
        where = claim.where if claim.where is not None else torch.ones(leaves[claim.field].shape, dtype=torch.bool)
        if not bool(where.any()):
            continue
        if grad is None:
            if claim.sign == 0:
                continue
            values = None
        else:
            values = grad[where]
            ok = values < 0 if claim.sign > 0 else values > 0 if claim.sign < 0 else values == 0
            if bool(ok.all()):
                continue
        expected = {1: "< 0 so that training raises", -1: "> 0 so that training lowers", 0: "0 so that training leaves"}
        raise CheckFailed(
            f"{case.condition}, d loss / d {claim.field}{claim.examples} = {_show(values)}; expected "
            f"{expected[claim.sign]} {claim.what}{' alone' if claim.sign == 0 else ''}."
        )


@check("loss")
def check_batch_independence(subject: Subject) -> None:
    """Shuffling the batch permutes the per-example losses the same way."""
    import torch

    loss, generator = _loss_inputs(subject)
    inputs = generator.example(batch=6, reference=loss.needs_reference)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = generator.permute(inputs, order)
    expected, got = _compute(loss, inputs).losses[order], _compute(loss, shuffled).losses
    if not torch.allclose(expected, got, atol=1e-6, rtol=1e-5, equal_nan=True):
        raise CheckFailed(
            f"example losses depend on the other examples in the batch: {_show(expected)} became {_show(got)} "
            "after shuffling.",
            "compute each example's loss from its own inputs and the batch-level values it is given only "
            "(or declare this check an expected failure).",
        )


@check("loss")
def check_inputs_not_mutated(subject: Subject) -> None:
    """The loss does not change its input tensors in place."""
    import torch

    loss, generator = _loss_inputs(subject)
    inputs = generator.example(batch=4, reference=loss.needs_reference)
    before = {name: value.clone() for name, value in _tensor_fields(inputs).items()}
    _compute(loss, inputs)
    changed = [name for name, value in before.items() if not torch.equal(getattr(inputs, name), value)]
    if changed:
        raise CheckFailed(f"the loss changed its inputs in place: {', '.join(changed)}.",
                          "use out-of-place operations (x = x * 2, not x.mul_(2)).")


@check("loss")
def check_deterministic(subject: Subject) -> None:
    """Two calls on the same inputs give identical, non-NaN losses."""
    import torch

    loss, generator = _loss_inputs(subject)
    inputs = generator.example(batch=4, reference=loss.needs_reference)
    first, second = _compute(loss, inputs).losses, _compute(loss, inputs).losses
    nan = torch.isnan(first)
    same = (first.shape == second.shape and torch.equal(nan, torch.isnan(second))
            and torch.equal(first.masked_fill(nan, 0), second.masked_fill(nan, 0)))
    where_nan = ""
    if bool(nan.any()) or bool(torch.isnan(second).any()):
        where_nan = (f"the loss returned NaN for examples {_nan_examples(first)}"
                     + (f" (and {_nan_examples(second)} the second time)" if not same else "") + " of plain inputs")
    if not same:
        raise CheckFailed(f"two calls gave {_show(first)} and {_show(second)}" + (f"; {where_nan}." if where_nan else "."),
                          "remove randomness from the loss.")
    if where_nan:
        raise CheckFailed(f"{where_nan}, the same twice: {_show(first)}.",
                          "guard divisions and logarithms (clamp denominators, use log-sigmoid / logsumexp forms).")


def _nan_examples(losses: Any) -> list[int]:
    import torch

    return torch.isnan(losses.detach().reshape(-1)).nonzero().flatten().tolist()


@check("loss")
def check_dtypes(subject: Subject) -> None:
    """The loss works on float32 and bfloat16 inputs, with finite floating-point results."""
    import torch

    loss, generator = _loss_inputs(subject)
    for dtype in (torch.float32, torch.bfloat16):
        out = _compute(loss, generator.example(batch=4, dtype=dtype, reference=loss.needs_reference))
        if not out.losses.is_floating_point() or not torch.isfinite(out.losses.float()).all():
            raise CheckFailed(f"with {dtype} inputs the losses are {_show(out.losses)} ({out.losses.dtype}).")


@check("loss", slow=True)
def check_training_lowers_loss(subject: Subject) -> None:
    """Eight optimiser steps of the loss's stage on the built-in tiny model lower the loss on a fixed batch.

    For a loss of an online stage (one that samples and judges: its stage has
    default judges) the logged loss is a surrogate on fresh samples each step
    (GRPO's is 0 up to rounding at ratio 1), so the check asks only for finite
    losses and non-zero gradients.
    """
    records = _train(subject, subject.component.stage, subject.component, steps=8, rows=8)
    losses = [r["loss"] for r in records if "loss" in r]
    if len(losses) < 8:
        raise CheckFailed(f"expected 8 logged losses, got {len(losses)}.")
    if not all(math.isfinite(x) for x in losses):
        raise CheckFailed(f"training produced non-finite losses: {losses}.")
    if subject.host.get("stage", subject.component.stage).default_judges:
        norms = [r["grad_norm"] for r in records if "grad_norm" in r]
        if not norms or not all(math.isfinite(n) for n in norms) or not any(n > 0 for n in norms):
            raise CheckFailed(f"an online loss must give finite, non-zero gradients; grad norms {norms}.")
        return
    if not sum(losses[-3:]) / 3 < losses[0]:
        raise CheckFailed(
            f"the loss did not fall over 8 steps on the same batch: first {losses[0]:.4g}, "
            f"last three {[round(x, 4) for x in losses[-3:]]}.",
            "check the sign of the loss: minimising it must improve the objective.",
        )


# --------------------------------------------------------------------------- stages
#
# The stage checks run the stage through molting.pipeline.run, as `molting run` does, on a few rows of its default
# data with the built-in tiny model. `refuses-bad-rows` makes two runs of its own on bad rows (each should stop
# before any training); the other three share ONE short run per stage and check_plugin call (_short_run).

QUICK_STAGE_PARAMS: dict[str, int] = {"max_new_tokens": 12, "num_generations": 4, "num_samples": 4,
                                      "generation_batch_size": 16, "num_ppo_epochs": 1, "eval_prompts": 0}
"""Caps on stage hyperparameters of these names (trl's and molting's), so an online stage's short run samples
little: 4 completions per prompt of at most 12 tokens."""

_ROWS, _BATCH, _STEPS = 8, 4, 1  # the short run: one optimizer step of 4 rows (of 8 written)
_BAD_ROWS, _BAD_ROW = 5, 2  # refuses-bad-rows: 5 rows, row 2 broken


@attrs.define
class StageRun:
    """What one run of a stage left: its output directory, what the hooks saw, and how it ended."""

    output_dir: Path
    recorder: HookRecorder
    error: BaseException | None = None
    log: str = ""  # the run's stdout and stderr (progress bars, molting's lines)
    seconds: float = 0.0

    def records(self) -> list[dict[str, Any]]:
        """metrics.jsonl's records ([] when there is none)."""
        path = self.output_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def raise_if_failed(self, what: str) -> None:
        if self.error is not None:
            raise CheckFailed(
                f"{what} raised {type(self.error).__name__}: {self.error}. Output:\n{self.log[-1500:]}"
            ) from self.error


class HookRecorder:
    """A plugin that records the lifecycle hooks of one run, and a trainer callback's events."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []  # (hook, stage name)
        self.logs: list[tuple[int, dict[str, Any]]] = []  # molting_on_log's (step, metrics)
        self.events: list[str] = []  # the callback's on_train_begin, on_step_end, on_log, on_train_end

    @hookimpl
    def molting_before_stage(self, stage: Any, config: Any) -> None:
        self.calls.append(("molting_before_stage", stage.name))

    @hookimpl
    def molting_after_stage(self, stage: Any, config: Any, output_dir: str, metrics: dict[str, Any]) -> None:
        self.calls.append(("molting_after_stage", stage.name))

    @hookimpl
    def molting_on_log(self, metrics: dict[str, Any], step: int) -> None:
        self.logs.append((step, dict(metrics)))

    @hookimpl
    def molting_trainer_callbacks(self, stage: Any, config: Any) -> list[Any]:
        from transformers import TrainerCallback

        self.calls.append(("molting_trainer_callbacks", stage.name))
        events = self.events

        class Recording(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                events.append("on_train_begin")

            def on_step_end(self, args, state, control, **kwargs):
                events.append("on_step_end")

            def on_log(self, args, state, control, logs=None, **kwargs):
                events.append("on_log")

            def on_train_end(self, args, state, control, **kwargs):
                events.append("on_train_end")

        return [Recording()]

    def called(self, hook: str, stage: str) -> bool:
        return (hook, stage) in self.calls


def _stage_rows(subject: Subject, count: int) -> list[dict[str, Any]]:
    """The first ``count`` rows of the stage's default data (copies), or :class:`CheckSkipped`."""
    stage = subject.component
    if stage.default_data is None:
        raise CheckSkipped(f"{subject.label} has no default data (Stage.default_data) to run on")
    try:
        dataset = subject.host.get("dataset", stage.default_data)
    except PluginError as exc:
        raise CheckFailed(f"the default data of {subject.label}, dataset {stage.default_data!r}, is not available: "
                          f"{exc}") from exc
    return [dict(row) for row in dataset.load("train")[:count]]


def _quick_params(stage: Any) -> dict[str, Any]:
    """The stage's demo hyperparameters, with the sampling ones capped (:data:`QUICK_STAGE_PARAMS`)."""
    fields = {f.name: f for f in attrs.fields(stage.params)}
    params = {k: v for k, v in stage.demo_defaults.items() if k in fields}
    for name, cap in QUICK_STAGE_PARAMS.items():
        if name in fields:
            value = params.get(name, fields[name].default)
            if isinstance(value, int) and not isinstance(value, bool):
                params[name] = min(value, cap)
    return params


@contextlib.contextmanager
def _one_thread():
    """torch on one thread while the tiny model runs: its ops are too small to share, and on 2 busy cores two
    threads made a stage's checks 10-15 times slower (0.6 s against 6-15 s for preference, grpo, ppo)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_stage(subject: Subject, rows: list[dict[str, Any]], where: Path, loss: Any = None, steps: int = _STEPS,
               batch_size: int = _BATCH, quick: bool = True, advantage: Any = None) -> StageRun:
    """Run the stage alone through molting.pipeline.run on ``rows`` (written to ``where/data.jsonl``) into
    ``where/run``, with a :class:`HookRecorder` on the host; the run's error is kept, not raised.

    ``loss`` defaults to the stage's ``default_loss``; ``quick`` caps the sampling hyperparameters
    (:data:`QUICK_STAGE_PARAMS`), else the stage's demo hyperparameters apply as they are.
    """
    import io
    import time

    from molting.config import DEMO_DEFAULTS, RunConfig
    from molting.context import Step
    from molting.pipeline import run

    stage, host = subject.component, subject.host
    if loss is None and stage.default_loss:
        loss = host.get("loss", stage.default_loss)
    where.mkdir(parents=True, exist_ok=True)
    data = where / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))  # a file, not the dataset: no demo evaluation
    config = RunConfig(
        plugins=[loss.name if loss else stage.name], data=str(data), output_dir=str(where / "run"),
        max_steps=steps, batch_size=batch_size, logging_steps=1, learning_rate=DEMO_DEFAULTS["learning_rate"],
        lr_scheduler_type="constant", eval="off",
        # an online stage scores its samples with the demo's rule judge: its default judge may need a model
        judges={"demo-rule": 1.0} if stage.default_judges else {},
        loss_params=_quick_params(stage) if quick else {k: v for k, v in stage.demo_defaults.items()
                                                        if k in {f.name for f in attrs.fields(stage.params)}},
    )
    recorder = HookRecorder()
    name = f"molting-check-recorder-{id(recorder)}"
    log = io.StringIO()
    started = time.perf_counter()
    outcome = StageRun(where / "run", recorder)
    host.pm.register(recorder, name=name)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), _one_thread():
            run(config, [Step(config.plugins[0], stage, loss, advantage=advantage)], host)
    except Exception as exc:
        outcome.error = exc
    finally:
        host.pm.unregister(name=name)
        outcome.log, outcome.seconds = log.getvalue(), time.perf_counter() - started
    return outcome


_SHORT_RUNS: dict[tuple[int, int, str], tuple[Any, StageRun | CheckSkipped]] = {}


def _short_run(subject: Subject) -> StageRun:
    """The stage's one short run (one optimizer step of 4 rows), shared by the checks of one check_plugin call.

    Keyed by the component and the scratch root: check_plugin gives all its checks workdirs under one scratch
    directory (pytest's tmp_path dirs share the session's base temp), so the run happens once per stage.
    """
    stage, root = subject.component, subject.workdir.parent
    key = (id(stage), id(subject.host), str(root))
    cached = _SHORT_RUNS.get(key)
    if cached is None or cached[0] is not stage:
        result: StageRun | CheckSkipped
        try:
            result = _run_stage(subject, _stage_rows(subject, _ROWS), subject.workdir / "short-run")
        except CheckSkipped as exc:
            result = exc
        cached = _SHORT_RUNS[key] = (stage, result)
    if isinstance(cached[1], CheckSkipped):
        raise cached[1]
    return cached[1]


def _forget_short_runs(root: Path) -> None:
    for key in [k for k in _SHORT_RUNS if k[2] == str(root)]:
        del _SHORT_RUNS[key]


def _short_run_ok(subject: Subject) -> StageRun:
    run = _short_run(subject)
    run.raise_if_failed(f"a one-step run of {subject.label} on {_ROWS} rows of {subject.component.default_data!r}")
    return run


@check("stage")
def check_refuses_bad_rows(subject: Subject) -> None:
    """A row lacking a declared column, or with a number for a text field, stops the run with a DataError naming it."""
    from molting.errors import DataError

    stage = subject.component
    if not stage.columns:
        raise CheckSkipped(f"{subject.label} declares no columns (Stage.columns)")
    rows = _stage_rows(subject, _BAD_ROWS)
    if len(rows) <= _BAD_ROW:
        raise CheckSkipped(f"the default data {stage.default_data!r} has fewer than {_BAD_ROW + 1} rows")
    row = rows[_BAD_ROW]
    cases = []
    missing = stage.columns[-1]
    if missing in row:
        cases.append((f"row {_BAD_ROW} without column {missing!r}", {k: v for k, v in row.items() if k != missing}))
    texts = [c for c in stage.columns if isinstance(row.get(c), (str, list))]
    if texts:
        cases.append((f"row {_BAD_ROW} with {texts[-1]}=7 (a number for a text field)", {**row, texts[-1]: 7}))
    if not cases:
        raise CheckSkipped(f"row {_BAD_ROW} of {stage.default_data!r} has none of the declared columns {stage.columns}")
    fix = ("check the rows before training, e.g. with molting.data.check_columns and check_text_fields, which raise "
           "a molting.DataError naming the row and the field.")
    for number, (case, bad) in enumerate(cases):
        result = _run_stage(subject, rows[:_BAD_ROW] + [bad] + rows[_BAD_ROW + 1:], subject.workdir / f"bad-{number}")
        started = "on_train_begin" in result.recorder.events
        if result.error is None:
            raise CheckFailed(f"a run on {case} completed without complaint"
                              f"{' and trained on it' if started else ''}.", fix)
        if not isinstance(result.error, DataError):
            raise CheckFailed(f"a run on {case} raised {type(result.error).__name__}: {result.error} "
                              "rather than a molting.DataError.", fix)
        if f"row {_BAD_ROW}" not in str(result.error):
            raise CheckFailed(f"the DataError for {case} does not name row {_BAD_ROW}: {result.error}",
                              "say which row is wrong: f\"{context.data_source}, row {index}: ...\".")
        if started:
            raise CheckFailed(f"{case} was refused only after training had started: {result.error}",
                              "check the rows before training (before or right after loading the model).")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _architecture(out: Path) -> str | None:
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return (config.get("architectures") or [None])[0]


@check("stage")
def check_writes_what_it_produces(subject: Subject) -> None:
    """After a one-step run OUTPUT holds what Stage.produces declares, and metrics.jsonl every declared metric."""
    stage = subject.component
    run = _short_run_ok(subject)
    out = run.output_dir
    files = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if stage.produces == "dataset":
        data = out / "data.jsonl"
        lines = [line for line in data.read_text().splitlines() if line.strip()] if data.exists() else []
        if not lines:
            raise CheckFailed(f"{subject.label} produces a dataset but wrote no rows to OUTPUT/data.jsonl "
                              f"(OUTPUT holds {files}).",
                              "write the rows the next step trains on to OUTPUT/data.jsonl.")
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise CheckFailed(f"OUTPUT/data.jsonl, line {number}, is not JSON: {exc}.") from exc
            if not isinstance(row, dict):
                raise CheckFailed(f"OUTPUT/data.jsonl, line {number}, is a {type(row).__name__}, not a JSON object.")
    elif (out / "adapter_config.json").exists() and not (out / "config.json").exists():
        if stage.produces != "policy":
            raise CheckFailed(f"{subject.label} produces a {stage.produces} but wrote only a LoRA adapter.")
        if not any(out.glob("adapter_model.*")):
            raise CheckFailed(f"OUTPUT has adapter_config.json but no adapter weights (OUTPUT holds {files}).")
    else:
        want = "ForCausalLM" if stage.produces == "policy" else "ForSequenceClassification"
        architecture = _architecture(out)
        if architecture is None:
            raise CheckFailed(
                f"{subject.label} produces a {stage.produces} but OUTPUT has no config.json naming an architecture "
                f"(OUTPUT holds {files}).",
                "save the model with model.save_pretrained(context.output_dir) (or molting.training.train_and_save).",
            )
        if not architecture.endswith(want):
            raise CheckFailed(f"{subject.label} produces a {stage.produces}, but config.json names {architecture!r}, "
                              f"not a *{want} model.")
        if not any(out.glob("*.safetensors")):
            raise CheckFailed(f"OUTPUT has no .safetensors weights (OUTPUT holds {files}).",
                              "save with safe_serialization=True.")
    if stage.produces != "dataset" and not any((out / name).exists() for name in _TOKENIZER_FILES):
        raise CheckFailed(f"OUTPUT has no tokenizer files (OUTPUT holds {files}).",
                          "save the tokenizer beside the model: tokenizer.save_pretrained(context.output_dir).")
    records = run.records()
    if not records:
        raise CheckFailed("OUTPUT/metrics.jsonl is missing or empty.",
                          "log with context.log(metrics, step) or molting.training.stage_callbacks(context).")
    _check_declared_metrics(stage, records)


def _check_declared_metrics(stage: Any, records: list[dict[str, Any]]) -> None:
    logged = set().union(*records) if records else set()
    missing = [m for m in stage.metrics if m not in logged]
    if missing:
        raise CheckFailed(f"metrics.jsonl lacks the declared metrics {missing}.", "log them or drop them from Stage.metrics.")


@check("stage")
def check_reloads_with_transformers(subject: Subject) -> None:
    """OUTPUT loads with plain transformers (Auto classes) and gives finite logits; a dataset loads with datasets."""
    import io

    stage = subject.component
    run = _short_run_ok(subject)
    out = run.output_dir
    if stage.produces == "dataset":
        import datasets

        data = out / "data.jsonl"
        if not data.exists():
            raise CheckFailed("OUTPUT/data.jsonl does not exist.")
        expected = sum(1 for line in data.read_text().splitlines() if line.strip())
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                loaded = datasets.load_dataset("json", data_files=str(data), split="train",
                                               cache_dir=str(subject.workdir / "datasets-cache"))
        except Exception as exc:
            raise CheckFailed(f'datasets.load_dataset("json", data_files=OUTPUT/data.jsonl) raised '
                              f"{type(exc).__name__}: {exc}", "give every row the same columns and types.") from exc
        if loaded.num_rows != expected or expected == 0:
            raise CheckFailed(f"datasets loaded {loaded.num_rows} rows from OUTPUT/data.jsonl, which has {expected}.")
        return
    import torch
    import transformers

    auto = (transformers.AutoModelForCausalLM if stage.produces == "policy"
            else transformers.AutoModelForSequenceClassification)
    if not (out / "config.json").exists() and not (out / "adapter_config.json").exists():
        raise CheckFailed("OUTPUT has neither config.json nor adapter_config.json: transformers has nothing to load.",
                          "save the model with save_pretrained into context.output_dir.")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the load report: the missing keys are checked below
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            model, info = auto.from_pretrained(out, output_loading_info=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckFailed(f"transformers.{auto.__name__}.from_pretrained(OUTPUT) or AutoTokenizer failed: "
                          f"{type(exc).__name__}: {first}",
                          "save with save_pretrained (model and tokenizer) into context.output_dir.") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise CheckFailed(f"{auto.__name__}.from_pretrained(OUTPUT) had to initialise weights the directory lacks: "
                          f"{missing[:5]}{' ...' if len(missing) > 5 else ''}.",
                          f"save the whole trained model (a {stage.produces}: "
                          f"{'a causal LM' if stage.produces == 'policy' else 'a sequence classifier with its head'}).")
    ids = tokenizer("What is 2 + 3?", return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        ids = torch.tensor([[tokenizer.eos_token_id or 0]])
    with torch.no_grad(), _one_thread():
        logits = model.eval()(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        raise CheckFailed(f"the reloaded {type(model).__name__} gives non-finite logits on a short input: "
                          f"{_show(logits)}.", "check the saved weights (a NaN step, a wrong dtype).")


def _record_key(step: Any, metrics: Mapping[str, Any]) -> str:
    return json.dumps({"step": step, **metrics}, sort_keys=True, default=str)


@check("stage")
def check_calls_the_hooks(subject: Subject) -> None:
    """The run calls molting_before/after_stage, the molting_trainer_callbacks callbacks, and on_log as it logs."""
    stage = subject.component
    run = _short_run_ok(subject)
    recorder = run.recorder
    for hook in ("molting_before_stage", "molting_after_stage"):
        if not recorder.called(hook, stage.name):
            raise CheckFailed(f"{hook} was not called for {subject.label} (molting.pipeline.run calls it).")
    if not recorder.called("molting_trainer_callbacks", stage.name):
        raise CheckFailed(
            f"{subject.label} never called the molting_trainer_callbacks hook, so plugins' callbacks never see it.",
            "pass molting.training.stage_callbacks(context) (or context.callbacks()) to the Trainer; a stage with "
            "its own loop sends their events with molting.training.LoopEvents.",
        )
    events = recorder.events
    if not events or events[0] != "on_train_begin" or events[-1] != "on_train_end" or "on_step_end" not in events:
        raise CheckFailed(
            "the callbacks from molting_trainer_callbacks should see on_train_begin first, at least one on_step_end "
            f"and on_train_end last; they saw {events[:6]}{' ...' if len(events) > 6 else ''}.",
            "hand them to the Trainer (callbacks=...), or send the events with molting.training.LoopEvents.",
        )
    records = run.records()
    if not recorder.logs:
        raise CheckFailed(
            f"molting_on_log was never called (metrics.jsonl has {len(records)} records).",
            "log with context.log(metrics, step) or molting.training.stage_callbacks(context), which call it.",
        )
    written = [_record_key(r.get("step"), {k: v for k, v in r.items() if k != "step"}) for r in records]
    seen = [_record_key(step, metrics) for step, metrics in recorder.logs]
    if written != seen:
        first = next((f"{a} (on_log) vs {b} (metrics.jsonl)" for a, b in zip(seen, written) if a != b), "in number")
        raise CheckFailed(
            f"molting_on_log got {len(seen)} logs and metrics.jsonl {len(written)} records, which differ: first "
            f"{first[:400]}.",
            "write metrics.jsonl and call the hook in one place: context.log(metrics, step).",
        )


def _train(subject: Subject, stage_name: str, loss: Any, steps: int, rows: int) -> list[dict[str, Any]]:
    """Train ``steps`` steps on ``rows`` rows of the stage's default data; returns metrics.jsonl's records."""
    host = subject.host
    try:
        stage = host.get("stage", stage_name)
    except Exception as exc:
        raise CheckFailed(f"stage {stage_name!r} of {subject.label} is not available: {exc}") from exc
    if stage.default_data is None:
        raise CheckSkipped(f"stage {stage_name!r} has no built-in data to train on")
    sample = host.get("dataset", stage.default_data).load("train")[:rows]
    result = _run_stage(attrs.evolve(subject, kind="stage", component=stage), sample, subject.workdir, loss=loss,
                        steps=steps, batch_size=rows, quick=False)
    if result.error is not None:
        raise CheckFailed(f"training raised {type(result.error).__name__}: {result.error}. "
                          f"Output:\n{result.log[-2000:]}") from result.error
    return result.records()


# --------------------------------------------------------------------------- judges


def _judge(subject: Subject, pairs: Callable[[list[str]], list[Any]] | None = None) -> list[Any]:
    """The judge's verdicts on three demo answers and an empty one, with the demo's ``answer`` column.

    The judge is called as a run calls it (:func:`molting.judging.call_judge`:
    async judges awaited, columns passed, results checked), with the settings
    its ``example`` gives for a scratch directory.
    """
    from molting import demo
    from molting.errors import JudgeError, MoltingError
    from molting.judging import Failed, JudgeSpec, call_judge

    judge = subject.component
    rows = demo.prompt_rows("test", 3)
    rows.append(rows[0])
    prompts = [r["prompt"] for r in rows]
    completions: list[Any] = [f" The answer is {r['answer']}." for r in rows[:-1]] + [""]
    if judge.kind == "pairwise":
        completions = (pairs or (lambda c: [(x, c[(i + 1) % len(c)]) for i, x in enumerate(c)]))(completions)
    try:
        settings = judge.example(subject.workdir) if judge.example is not None else {}
        spec = JudgeSpec(judge.name, judge, 1.0, judge.params(**settings))
        verdicts = call_judge(spec, prompts, completions, {"answer": [r["answer"] for r in rows]},
                              list(range(len(rows))))
    except JudgeError as exc:
        raise CheckFailed(str(exc)) from exc
    except (MoltingError, TypeError, ValueError) as exc:
        raise CheckFailed(
            f"the judge cannot score the demo prompts with {'its example settings' if judge.example else 'its defaults'}: {exc}",
            "give the Judge an `example` that returns working settings for a scratch directory.",
        ) from exc
    failed = [i for i, v in enumerate(verdicts) if isinstance(v, Failed)]
    if failed:
        raise CheckFailed(f"the judge could not judge completion {failed[0]} of the demo prompts: "
                          f"{verdicts[failed[0]].reason}")
    return verdicts


@check("judge")
def check_scores(subject: Subject) -> None:
    """One finite score per completion (or 0, 1 or -1 per pair), the empty completion included."""
    _judge(subject)  # call_judge checks the count and each value


@check("judge")
def check_judge_deterministic(subject: Subject) -> None:
    """A judge declared deterministic gives the same scores twice."""
    judge = subject.component
    if not judge.deterministic:
        raise CheckSkipped(f"{subject.label} declares deterministic=False")
    reversed_pairs = lambda c: [(x, x[::-1]) for x in c]  # noqa: E731
    first, second = _judge(subject, reversed_pairs), _judge(subject, reversed_pairs)
    if first != second:
        raise CheckFailed(f"two calls gave {first} and {second}.", "seed any sampling or declare deterministic=False.")


# --------------------------------------------------------------------------- datasets


@check("dataset")
def check_rows_match_schema(subject: Subject) -> None:
    """Every declared split loads, is not empty, and each row has the declared columns."""
    dataset = subject.component
    for split in dataset.splits:
        rows = dataset.load(split)
        if not rows:
            raise CheckFailed(f"split {split!r} of {subject.label} has no rows.")
        for index, row in enumerate(rows):
            missing = [c for c in dataset.columns if c not in row or row[c] in (None, "")]
            if missing:
                raise CheckFailed(f"split {split!r}, row {index}: missing or empty column(s) {missing}.")


@check("dataset")
def check_bad_row_rejected(subject: Subject) -> None:
    """A row with a declared column removed is rejected by molting's validation, naming its index."""
    from molting.data import check_columns
    from molting.errors import DataError

    dataset = subject.component
    if not dataset.columns:
        raise CheckSkipped(f"{subject.label} declares no columns")
    rows = [dict(r) for r in dataset.load(dataset.splits[0])[:5]]
    bad = min(2, len(rows) - 1)
    del rows[bad][dataset.columns[-1]]
    try:
        check_columns(rows, [tuple(dataset.columns)], subject.label, "a")
    except DataError as exc:
        if f"row {bad}" not in str(exc):
            raise CheckFailed(f"the error does not name row {bad}: {exc}")
        return
    raise CheckFailed(f"row {bad} without column {dataset.columns[-1]!r} was accepted.")


# --------------------------------------------------------------------------- advantage estimators

_GROUPS, _G, _WIDTH = 3, 4, 6


def _advantage_inputs(advantage: Any, seed: int = 0, **overrides: Any) -> Any:
    """A generation batch of 3 prompts x 4 completions, ragged masks, with only the fields the estimator needs."""
    import torch

    from molting.advantages import last_token_rewards
    from molting.components import AdvantageInputs

    g = torch.Generator().manual_seed(seed)
    n = _GROUPS * _G
    lengths = torch.randint(1, _WIDTH + 1, (n,), generator=g)
    mask = (torch.arange(_WIDTH)[None, :] < lengths[:, None]).float()
    rewards = torch.randint(0, 3, (n,), generator=g).float() + 0.1 * torch.randn(n, generator=g)
    kl = 0.2 * torch.randn(n, _WIDTH, generator=g) * mask
    fields = dict(rewards=rewards, groups=torch.arange(n) // _G, mask=mask,
                  values=torch.randn(n, _WIDTH, generator=g) * mask,
                  token_rewards=last_token_rewards(rewards, mask) - 0.05 * kl, kl=kl,
                  baselines=torch.randn(_GROUPS, generator=g).repeat_interleave(_G))
    fields.update(overrides)
    needs = advantage.requirements(advantage.params())
    wanted = {"values": "values", "token_rewards": "token_rewards", "reference": "kl", "greedy": "baselines"}
    for need, name in wanted.items():
        if need not in needs:
            fields[name] = None
    return AdvantageInputs(**fields)


def _estimate(subject: Subject, inputs: Any) -> Any:
    """The estimator's output, checked: an AdvantageOutput whose advantages are (N,) or (N, T), finite."""
    import torch

    from molting.components import AdvantageOutput

    advantage = subject.component
    try:
        out = advantage.compute(inputs, advantage.params())
    except Exception as exc:
        raise CheckFailed(f"{subject.label} raised {type(exc).__name__}: {exc} on inputs holding only what it "
                          f"declares it needs ({advantage.requirements(advantage.params()) or 'nothing more'}).",
                          "declare what compute reads in Advantage.needs") from exc
    if not isinstance(out, AdvantageOutput):
        raise CheckFailed(f"{subject.label} returned {type(out).__name__}; expected a molting.AdvantageOutput.")
    n, shape = inputs.rewards.numel(), tuple(out.advantages.shape)
    if shape not in ((n,), tuple(inputs.mask.shape)):
        raise CheckFailed(f"advantages have shape {shape}; expected ({n},) or {tuple(inputs.mask.shape)}.")
    if not out.advantages.is_floating_point() or not torch.isfinite(out.advantages).all():
        raise CheckFailed(f"advantages are not finite floating-point values: {_show(out.advantages)}.")
    return out


def _first_token(advantages: Any) -> Any:
    return advantages[:, 0] if advantages.dim() == 2 else advantages


@check("advantage")
def check_advantage_shapes(subject: Subject) -> None:
    """One finite advantage per completion (N,) or per token (N, T), zero off the mask; returns (N, T) or None."""
    inputs = _advantage_inputs(subject.component)
    out = _estimate(subject, inputs)
    if out.advantages.dim() == 2 and (out.advantages * (1 - inputs.mask)).abs().sum() > 0:
        raise CheckFailed("per-token advantages are not zero on the padding.", "multiply by inputs.mask")
    if out.returns is not None and tuple(out.returns.shape) != tuple(inputs.mask.shape):
        raise CheckFailed(f"returns have shape {tuple(out.returns.shape)}; expected {tuple(inputs.mask.shape)}.")


@check("advantage")
def check_advantage_finite_on_extreme_inputs(subject: Subject) -> None:
    """Advantages stay finite for rewards of ±1e4, all-equal rewards, a fully masked completion, a batch of 2."""
    import torch

    advantage = subject.component
    n = _GROUPS * _G
    cases = {
        "rewards of ±1e4": dict(rewards=1e4 * torch.linspace(-1, 1, n)),
        "all-equal rewards": dict(rewards=torch.ones(n), baselines=torch.ones(n)),
        "a fully masked completion": dict(mask=torch.ones(n, _WIDTH).index_fill_(0, torch.tensor([1]), 0.0)),
    }
    for name, overrides in cases.items():
        try:
            _estimate(subject, _advantage_inputs(advantage, **overrides))
        except CheckFailed as exc:
            raise CheckFailed(f"with {name}: {exc}") from exc
    pair = _advantage_inputs(advantage)
    two = {f.name: None if getattr(pair, f.name) is None else getattr(pair, f.name)[:2]
           for f in attrs.fields(type(pair))}
    try:
        _estimate(subject, type(pair)(**two))
    except CheckFailed as exc:
        raise CheckFailed(f"with a batch of one group of 2: {exc}") from exc


@check("advantage")
def check_advantage_order(subject: Subject) -> None:
    """Within a group of equal-length completions with equal values, a higher reward never gets a lower advantage."""
    import torch

    n = _GROUPS * _G
    rewards = torch.arange(n, dtype=torch.float32).flip(0) % 5
    base = _advantage_inputs(subject.component, rewards=rewards, mask=torch.ones(n, _WIDTH),
                             values=torch.zeros(n, _WIDTH), kl=torch.zeros(n, _WIDTH))
    if base.token_rewards is not None:
        from molting.advantages import last_token_rewards

        base = attrs.evolve(base, token_rewards=last_token_rewards(rewards, base.mask))
    first = _first_token(_estimate(subject, base).advantages)
    for group in range(_GROUPS):
        rows = torch.arange(group * _G, (group + 1) * _G)
        order = torch.argsort(rewards[rows])
        if (first[rows][order].diff() < -1e-6).any():
            raise CheckFailed(f"group {group}: rewards {rewards[rows].tolist()} got advantages "
                              f"{[round(v, 4) for v in first[rows].tolist()]}: a better completion ranks lower.")


@check("advantage")
def check_advantage_equal_rows(subject: Subject) -> None:
    """Identical completions of one prompt (same reward, mask, values, KL) get identical advantages."""
    import torch

    inputs = _advantage_inputs(subject.component)
    copies = {}
    for f in attrs.fields(type(inputs)):
        value = getattr(inputs, f.name)
        if value is not None and f.name != "groups":
            value = value.clone()
            value[1:_G] = value[0]  # the first group's rows all equal the first
        copies[f.name] = value
    out = _estimate(subject, type(inputs)(**copies)).advantages
    if not torch.allclose(out[:_G], out[:1].expand_as(out[:_G]), atol=1e-6):
        raise CheckFailed(f"four identical completions got advantages {_show(_first_token(out[:_G]))}.")


@check("advantage")
def check_advantage_permutation(subject: Subject) -> None:
    """Shuffling the batch (rows and their group ids together) shuffles the advantages the same way."""
    import torch

    inputs = _advantage_inputs(subject.component, seed=1)
    order = torch.randperm(inputs.rewards.numel(), generator=torch.Generator().manual_seed(3))
    shuffled = type(inputs)(**{f.name: None if getattr(inputs, f.name) is None else getattr(inputs, f.name)[order]
                               for f in attrs.fields(type(inputs))})
    before, after = _estimate(subject, inputs).advantages, _estimate(subject, shuffled).advantages
    if not torch.allclose(before[order], after, atol=1e-5):
        raise CheckFailed(f"advantages {_show(before[order])} became {_show(after)} once the batch was shuffled.")


@check("advantage")
def check_advantage_deterministic(subject: Subject) -> None:
    """Two calls on the same inputs give identical advantages and leave the inputs unchanged."""
    import torch

    inputs = _advantage_inputs(subject.component, seed=2)
    kept = {f.name: getattr(inputs, f.name).clone() for f in attrs.fields(type(inputs)) if getattr(inputs, f.name) is not None}
    first, second = _estimate(subject, inputs).advantages, _estimate(subject, inputs).advantages
    if not torch.equal(first, second):
        raise CheckFailed(f"two calls gave {_show(first)} and {_show(second)}.")
    changed = [name for name, value in kept.items() if not torch.equal(value, getattr(inputs, name))]
    if changed:
        raise CheckFailed(f"the estimator changed its inputs in place: {', '.join(changed)}.", "clone before editing")


@check("advantage", slow=True)
def check_advantage_trains(subject: Subject) -> None:
    """Two optimiser steps of its first stage on the built-in tiny model with this estimator: finite losses."""
    advantage, host = subject.component, subject.host
    try:
        stage = host.get("stage", advantage.stages[0])
    except Exception as exc:
        raise CheckFailed(f"stage {advantage.stages[0]!r} of {subject.label} is not available: {exc}") from exc
    rows = host.get("dataset", stage.default_data).load("train")[:8]
    loss = host.get("loss", stage.default_loss) if stage.default_loss else None
    result = _run_stage(attrs.evolve(subject, kind="stage", component=stage), rows, subject.workdir, loss=loss,
                        steps=2, batch_size=8, advantage=advantage)
    if result.error is not None:
        raise CheckFailed(f"training raised {type(result.error).__name__}: {result.error}. "
                          f"Output:\n{result.log[-2000:]}") from result.error
    losses = [v for r in result.records() for k, v in r.items() if k == "loss" or k.startswith("loss/")]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise CheckFailed(f"training logged losses {losses}; expected finite ones (loss, or PPO's loss/*).")


# --------------------------------------------------------------------------- samplers


def _sampler_run(subject: Subject, **settings: Any) -> tuple[Any, Any]:
    """The sampler's and the hf sampler's Samples for 6 demo prompts with the built-in model."""
    from molting import demo
    from molting.models import load_causal_lm
    from molting.sampling import SamplingRequest, sample

    sampler = subject.component
    problem = sampler.available()
    if problem:
        raise CheckSkipped(f"{subject.label} cannot run here: {problem}")
    from molting.sampling import sampler_settings

    model, tokenizer = load_causal_lm(demo.demo_model_dir())
    prompts = [r["prompt"] for r in demo.prompt_rows("test", 6)]
    try:
        own = sampler_settings(sampler, sampler.example(subject.workdir) if sampler.example else {})
    except Exception as exc:
        raise CheckFailed(f"{subject.label}'s example settings do not work: {exc}",
                          "give the Sampler an `example` that returns working settings for a scratch directory.")
    request = SamplingRequest(model, tokenizer, prompts, **settings, settings=own)
    try:
        with _one_thread():
            ours = sampler.sample(request)
            theirs = sample(model, tokenizer, prompts, **settings)
    except Exception as exc:
        raise CheckFailed(f"{subject.label} raised {type(exc).__name__}: {exc}") from exc
    return ours, theirs


def _kept(samples: Any) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(samples.completion_ids, samples.completion_mask)]


@check("sampler")
def check_sampler_greedy_matches_hf(subject: Subject) -> None:
    """At temperature 0 the completions (tokens and texts) are the hf sampler's greedy ones, 2 per prompt."""
    ours, theirs = _sampler_run(subject, n=2, max_new_tokens=12, temperature=0)
    if _kept(ours) != _kept(theirs) or ours.texts != theirs.texts:
        first = next(i for i, (a, b) in enumerate(zip(_kept(ours), _kept(theirs))) if a != b) \
            if _kept(ours) != _kept(theirs) else 0
        raise CheckFailed(f"greedy completion {first} differs from hf's: {ours.texts[first]!r} against "
                          f"{theirs.texts[first]!r}.", "decode greedily at temperature 0, stopping at the stop tokens")


@check("sampler")
def check_sampler_samples_layout(subject: Subject) -> None:
    """n completions per prompt in prompt order, masks up to the first stop token, texts the decoded kept tokens."""
    ours, _ = _sampler_run(subject, n=3, max_new_tokens=10, temperature=1.0)
    n = len(ours.texts)
    if n != 18 or ours.rows != [i for i in range(6) for _ in range(3)]:
        raise CheckFailed(f"expected 18 completions grouped by prompt (rows [0, 0, 0, 1, ...]); got {n}, rows "
                          f"{ours.rows[:9]}...")
    shapes = {name: tuple(getattr(ours, name).shape) for name in ("prompt_ids", "prompt_mask", "completion_ids",
                                                                 "completion_mask")}
    if any(shape[0] != n for shape in shapes.values()) or ours.completion_ids.size(1) > 10:
        raise CheckFailed(f"tensor shapes {shapes}: expected {n} rows and at most 10 completion tokens.")
    mask = ours.completion_mask
    if (mask[:, 1:] > mask[:, :-1]).any():
        raise CheckFailed("a completion mask has a gap: it must run from the first token up to the stop token.")


# --------------------------------------------------------------------------- running


def _show(tensor: Any) -> str:
    if tensor is None:
        return "None"
    values = tensor.detach().float().reshape(-1).tolist()
    shown = ", ".join(f"{v:.4g}" for v in values[:12])
    return f"[{shown}, ... ({len(values)} values)]" if len(values) > 12 else f"[{shown}]"


def subjects_for(target: Any, host: PluginHost, kind: str | None = None) -> list[Subject]:
    """Resolve a plugin name, a component name, or a component object into subjects to check."""
    if not isinstance(target, str):
        for kind_name, cls in COMPONENT_TYPES.items():
            if isinstance(target, cls):
                return [Subject(kind_name, target, host)]
        raise TypeError(f"cannot check {target!r}: expected a name or a molting.Stage/Loss/Judge/Dataset")
    kinds = [kind] if kind else list(KINDS)
    conflicts = [(k, target) for k in kinds if (k, target) in host.conflicts]
    if conflicts:
        raise _conflict_error(host, conflicts)
    found = [Subject(k, host.components[k][target].component, host, host.components[k][target])
             for k in kinds if target in host.components[k]]
    if found:
        return found
    plugin = host.plugins.get(target)
    if plugin is not None:
        if plugin.status != "ok":
            raise PluginError(f"plugin {target!r} ({plugin.source}) is {plugin.status}: {plugin.error}")
        return plugin_subjects(target, host)
    raise PluginError(
        f"no installed plugin or component named {target!r}. "
        + "; ".join(host.available(k) for k in KINDS)
    )


def plugin_subjects(plugin: str, host: Any) -> list[Subject]:
    """The components plugin ``plugin`` registered, as check subjects (a conflicting name refuses)."""
    names = [tuple(kind_name.split(":", 1)) for kind_name in host.plugins[plugin].components]
    conflicts = [key for key in names if key in host.conflicts]
    if conflicts:
        raise _conflict_error(host, conflicts)
    return [Subject(kind, host.components[kind][name].component, host, host.components[kind][name])
            for kind, name in names]


def _conflict_error(host: Any, conflicts: list[tuple[str, str]]) -> Exception:
    """Two distributions provide one name: the registry holds only the first, so checking it would pass or fail
    the wrong one."""
    return PluginError("; ".join(
        f"{kind} {name!r} is provided by both {' and '.join(p.source for p in plugins)} (plugins "
        f"{', '.join(repr(p.name) for p in plugins)}): uninstall one of them, or disable one with "
        f"MOLTING_DISABLE_PLUGINS={plugins[-1].name}, and check again"
        for kind, name in conflicts for plugins in [host.conflicts[(kind, name)]]
    ))


def run_check(chk: Check, subject: Subject, expected_failures: Mapping[str, str] | None = None) -> CheckResult:
    expected = _expected(chk, subject, expected_failures or {})
    try:
        chk.fn(subject)
    except CheckSkipped as exc:
        return CheckResult(subject.label, chk.name, "skipped", str(exc))
    except CheckFailed as exc:
        status = "xfailed" if expected is not None else "failed"
        return CheckResult(subject.label, chk.name, status, str(exc) if expected is None else f"{exc} (expected: {expected})")
    except Exception as exc:  # a crash in the component is a failure of the check, not of the suite
        status = "xfailed" if expected is not None else "failed"
        return CheckResult(subject.label, chk.name, status, f"raised {type(exc).__name__}: {exc}")
    if expected is not None:
        return CheckResult(subject.label, chk.name, "xpassed", f"declared as an expected failure ({expected}) but passed")
    return CheckResult(subject.label, chk.name, "passed")


def _expected(chk: Check, subject: Subject, expected_failures: Mapping[str, str]) -> str | None:
    return expected_failures.get(f"{subject.label}:{chk.name}") or expected_failures.get(chk.name)


def check_plugin(
    target: Any,
    *,
    kind: str | None = None,
    expected_failures: Mapping[str, str] | None = None,
    skip_slow: bool = False,
    host: PluginHost | None = None,
    checks: Iterable[str] | None = None,
) -> list[CheckResult]:
    """Run the conformance checks on an installed plugin, a component name, or a component object.

    ``expected_failures`` maps a check name (``"batch-independence"``) or a
    component-qualified one (``"loss:aot:batch-independence"``) to the reason
    it is expected to fail, as scikit-learn's ``check_estimator`` does.
    ``skip_slow`` leaves out the checks that train a model.
    """
    host = host or load_plugins()
    results = []
    with tempfile.TemporaryDirectory(prefix="molting-check-") as scratch:
        try:
            for number, subject in enumerate(subjects_for(target, host, kind)):
                for chk in checks_for(subject.kind, skip_slow):
                    if checks is None or chk.name in checks:
                        workdir = Path(scratch) / f"{number}-{chk.name}"
                        workdir.mkdir()
                        results.append(run_check(chk, attrs.evolve(subject, workdir=workdir), expected_failures))
        finally:
            _forget_short_runs(Path(scratch))  # the stage checks' shared runs (_short_run) lived in scratch
    return results
