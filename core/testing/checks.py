"""The conformance checks, one small function each, and :func:`check_plugin` to run them.

A check receives a :class:`Subject` (the component, how it was found, a
scratch directory) and either returns (passed), raises :class:`CheckFailed`
with what is wrong and how to fix it, or raises :class:`CheckSkipped` with a
reason. Checks are registered per kind with :func:`check`; ``kind="any"``
checks run for every component.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import attrs

from molting.components import COMPONENT_TYPES, KINDS, NAME_PATTERN, PreferenceInputs
from molting.discovery import ENTRY_POINT_GROUP, PluginHost, Registered, load_plugins


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


@check("any")
def check_params_reject_bad_values(subject: Subject) -> None:
    """Each numeric hyperparameter rejects NaN and a string with a message."""
    params = _params_class(subject)
    numeric = [f for f in attrs.fields(params) if isinstance(f.default, (int, float)) and not isinstance(f.default, bool)]
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


def example_inputs(batch: int = 6, dtype: Any = None, seed: int = 0, reference: bool = True) -> PreferenceInputs:
    """Random but plausible inputs of the preference stage: log-probs in [-60, -1], 3-30 tokens."""
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(seed)
    logps = -1 - 59 * torch.rand(4, batch, generator=g)
    lengths = torch.randint(3, 31, (2, batch), generator=g)
    width = int(lengths.max())
    mask = (torch.arange(width)[None, :] < lengths[0][:, None]).float()
    return PreferenceInputs(
        chosen_logps=logps[0].to(dtype),
        rejected_logps=logps[1].to(dtype),
        ref_chosen_logps=logps[2].to(dtype) if reference else None,
        ref_rejected_logps=logps[3].to(dtype) if reference else None,
        chosen_lengths=lengths[0],
        rejected_lengths=lengths[1],
        chosen_token_logps=(mask * (logps[0] / lengths[0])[:, None]).to(dtype),
        chosen_mask=mask.to(dtype),
    )


def with_logps(inputs: PreferenceInputs, chosen: Any, rejected: Any, **changes: Any) -> PreferenceInputs:
    """``inputs`` with new summed log-probs; the per-token chosen log-probs are rebuilt from ``chosen``
    (spread evenly over its tokens) so that gradients reach ``chosen`` either way."""
    mask = inputs.chosen_mask
    lengths = mask.sum(dim=1).clamp(min=1)
    token_logps = mask * (chosen / lengths.to(chosen.dtype))[:, None].to(mask.dtype)
    return attrs.evolve(inputs, chosen_logps=chosen, rejected_logps=rejected, chosen_token_logps=token_logps, **changes)


def _preference_loss(subject: Subject):
    loss = subject.component
    if loss.stage != "preference":
        raise CheckSkipped(
            f"{subject.label} runs in stage {loss.stage!r}, whose inputs the suite does not generate; "
            "its training check still applies"
        )
    return loss


def _compute(loss: Any, inputs: PreferenceInputs):
    return loss.compute(inputs, loss.params())


@check("loss")
def check_output_shapes(subject: Subject) -> None:
    """Per-example losses of shape (batch,), floating point, and rewards of the same shape."""
    loss = _preference_loss(subject)
    out = _compute(loss, example_inputs(batch=5, reference=loss.needs_reference))
    losses = getattr(out, "losses", None)
    if losses is None or tuple(losses.shape) != (5,):
        raise CheckFailed(
            f"losses has shape {None if losses is None else tuple(losses.shape)} for a batch of 5; expected (5,).",
            "return one loss per example (the stage averages them); do not reduce inside the loss.",
        )
    if not losses.is_floating_point():
        raise CheckFailed(f"losses has dtype {losses.dtype}; expected a floating-point dtype.")
    for name in ("chosen_rewards", "rejected_rewards"):
        value = getattr(out, name)
        if value is not None and tuple(value.shape) != (5,):
            raise CheckFailed(f"{name} has shape {tuple(value.shape)}; expected (5,) or None.")


@check("loss")
def check_finite_on_extreme_inputs(subject: Subject) -> None:
    """Losses and gradients stay finite for log-probs of ±1e4, equal log-probs, and a batch of 1."""
    import torch

    loss = _preference_loss(subject)
    base = example_inputs(batch=4, reference=loss.needs_reference)
    big = torch.tensor([-1e4, 1e4, -1e4, 0.0])
    reference = loss.needs_reference
    one = example_inputs(batch=1, reference=reference)
    cases = {
        "log-probs of ±1e4": (base, big, -big, {"ref_chosen_logps": -big, "ref_rejected_logps": big} if reference else {}),
        "equal log-probs": (base, base.chosen_logps, base.chosen_logps.clone(),
                            {"ref_rejected_logps": base.ref_chosen_logps} if reference else {}),
        "a batch of 1": (one, one.chosen_logps, one.rejected_logps, {}),
    }
    for case, (inputs, chosen, rejected, changes) in cases.items():
        chosen = chosen.clone().requires_grad_(True)
        rejected = rejected.clone().requires_grad_(True)
        out = _compute(loss, with_logps(inputs, chosen, rejected, **changes))
        if not torch.isfinite(out.losses).all():
            raise CheckFailed(f"losses are not finite for {case}: {out.losses.tolist()}.",
                              "use log-sigmoid / logsumexp forms instead of log(sigmoid(x)) or exp(x).")
        if not out.losses.requires_grad:
            raise CheckFailed("the losses do not depend on the policy's log-probs (no gradient).")
        out.losses.sum().backward()
        grads = [g for g in (chosen.grad, rejected.grad) if g is not None]
        if not all(torch.isfinite(g).all() for g in grads):
            raise CheckFailed(f"gradients are not finite for {case}.")


@check("loss")
def check_gradient_direction(subject: Subject) -> None:
    """At zero margin the gradient raises the chosen response's log-prob and lowers the rejected one's."""
    import torch

    loss = _preference_loss(subject)
    inputs = example_inputs(batch=4, reference=loss.needs_reference)
    same = torch.full((4,), -10.0)
    chosen, rejected = same.clone().requires_grad_(True), same.clone().requires_grad_(True)
    inputs = with_logps(
        inputs, chosen, rejected,
        ref_chosen_logps=same.clone() if loss.needs_reference else None,
        ref_rejected_logps=same.clone() if loss.needs_reference else None,
        chosen_lengths=torch.full((4,), 10), rejected_lengths=torch.full((4,), 10),
    )
    _compute(loss, inputs).losses.sum().backward()
    # descending the loss moves each log-prob by -grad: chosen must go up (grad < 0), rejected down (grad > 0)
    if chosen.grad is None or not (chosen.grad < 0).all():
        raise CheckFailed(
            f"at zero margin, d loss / d chosen_logps = {_show(chosen.grad)}; expected < 0 so that training "
            "raises the chosen response's probability."
        )
    if rejected.grad is None or not (rejected.grad > 0).all():
        raise CheckFailed(
            f"at zero margin, d loss / d rejected_logps = {_show(rejected.grad)}; expected > 0 so that training "
            "lowers the rejected response's probability."
        )


@check("loss")
def check_batch_independence(subject: Subject) -> None:
    """Shuffling the batch permutes the per-example losses the same way."""
    import torch

    loss = _preference_loss(subject)
    inputs = example_inputs(batch=6, reference=loss.needs_reference)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = attrs.evolve(inputs, **{
        f.name: getattr(inputs, f.name)[order] for f in attrs.fields(PreferenceInputs) if getattr(inputs, f.name) is not None
    })
    expected, got = _compute(loss, inputs).losses[order], _compute(loss, shuffled).losses
    if not torch.allclose(expected, got, atol=1e-6, rtol=1e-5):
        raise CheckFailed(
            f"example losses depend on the other examples in the batch: {_show(expected)} became {_show(got)} "
            "after shuffling.",
            "compute each example's loss from its own inputs only (or declare this check an expected failure).",
        )


@check("loss")
def check_inputs_not_mutated(subject: Subject) -> None:
    """The loss does not change its input tensors in place."""
    loss = _preference_loss(subject)
    inputs = example_inputs(batch=4, reference=loss.needs_reference)
    before = {f.name: getattr(inputs, f.name).clone() for f in attrs.fields(PreferenceInputs) if getattr(inputs, f.name) is not None}
    _compute(loss, inputs)
    changed = [name for name, value in before.items() if not bool((getattr(inputs, name) == value).all())]
    if changed:
        raise CheckFailed(f"the loss changed its inputs in place: {', '.join(changed)}.",
                          "use out-of-place operations (x = x * 2, not x.mul_(2)).")


@check("loss")
def check_deterministic(subject: Subject) -> None:
    """Two calls on the same inputs give identical losses."""
    import torch

    loss = _preference_loss(subject)
    inputs = example_inputs(batch=4, reference=loss.needs_reference)
    first, second = _compute(loss, inputs).losses, _compute(loss, inputs).losses
    if not torch.equal(first, second):
        raise CheckFailed(f"two calls gave {_show(first)} and {_show(second)}.", "remove randomness from the loss.")


@check("loss")
def check_dtypes(subject: Subject) -> None:
    """The loss works on float32 and bfloat16 inputs, with finite floating-point results."""
    import torch

    loss = _preference_loss(subject)
    for dtype in (torch.float32, torch.bfloat16):
        out = _compute(loss, example_inputs(batch=4, dtype=dtype, reference=loss.needs_reference))
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


@check("stage", slow=True)
def check_two_step_run(subject: Subject) -> None:
    """A two-step run on the built-in model writes a loadable model and every metric the stage declares."""
    import transformers

    stage = subject.component
    records = _train(subject, stage.name, None, steps=2, rows=8)
    out = subject.workdir / "run"
    if stage.produces == "dataset":
        data = out / "data.jsonl"
        if not data.exists() or not data.read_text().strip():
            raise CheckFailed(f"stage {stage.name!r} produces a dataset but wrote no rows to {data}.",
                              "write the rows the next step trains on to OUTPUT/data.jsonl.")
        records = records or []
        _check_declared_metrics(stage, records)
        return
    config = transformers.AutoConfig.from_pretrained(out)
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise CheckFailed(f"the saved config.json names architecture {architecture!r}, which transformers lacks.")
    model_class.from_pretrained(out)
    _check_declared_metrics(stage, records)


def _check_declared_metrics(stage: Any, records: list[dict[str, Any]]) -> None:
    logged = set().union(*records) if records else set()
    missing = [m for m in stage.metrics if m not in logged]
    if missing:
        raise CheckFailed(f"metrics.jsonl lacks the declared metrics {missing}.", "log them or drop them from Stage.metrics.")


def _train(subject: Subject, stage_name: str, loss: Any, steps: int, rows: int) -> list[dict[str, Any]]:
    """Train ``steps`` steps on ``rows`` rows of the stage's default data; returns metrics.jsonl's records."""
    from molting.config import DEMO_DEFAULTS, RunConfig
    from molting.run import Step, run

    host = subject.host
    try:
        stage = host.get("stage", stage_name)
    except Exception as exc:
        raise CheckFailed(f"stage {stage_name!r} of {subject.label} is not available: {exc}") from exc
    if stage.default_data is None:
        raise CheckSkipped(f"stage {stage_name!r} has no built-in data to train on")
    data = subject.workdir / "data.jsonl"
    sample = host.get("dataset", stage.default_data).load("train")[:rows]
    data.write_text("".join(json.dumps(r) + "\n" for r in sample))
    if loss is None and stage.default_loss:
        loss = host.get("loss", stage.default_loss)
    config = RunConfig(
        plugins=[loss.name if loss else stage.name], data=str(data), output_dir=str(subject.workdir / "run"),
        max_steps=steps, batch_size=rows, logging_steps=1, learning_rate=DEMO_DEFAULTS["learning_rate"],
        lr_scheduler_type="constant",
        # an online stage scores its samples with the demo's rule judge: its default judge may need a model
        judges={"demo-rule": 1.0} if stage.default_judges else {},
        loss_params={k: v for k, v in stage.demo_defaults.items() if k in {f.name for f in attrs.fields(stage.params)}},
    )
    import contextlib
    import io

    log = io.StringIO()  # the trainer's progress bars and log lines, shown only if the run fails
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            run(config, [Step(config.plugins[0], stage, loss)], host)
    except Exception as exc:
        raise CheckFailed(f"training raised {type(exc).__name__}: {exc}. Output:\n{log.getvalue()[-2000:]}") from exc
    lines = (subject.workdir / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# --------------------------------------------------------------------------- judges


def _judge(subject: Subject, pairs: Callable[[list[str]], list[Any]] | None = None) -> list[Any]:
    """The judge's verdicts on three demo answers and an empty one, with the demo's ``answer`` column.

    The judge is called as a run calls it (:func:`molting.judging.call_judge`:
    async judges awaited, columns passed, results checked), with the settings
    its ``example`` gives for a scratch directory.
    """
    from molting import demo
    from molting.errors import JudgeError, MoltingError
    from molting.judging import JudgeSpec, call_judge

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
        return call_judge(spec, prompts, completions, {"answer": [r["answer"] for r in rows]}, list(range(len(rows))))
    except JudgeError as exc:
        raise CheckFailed(str(exc)) from exc
    except (MoltingError, TypeError, ValueError) as exc:
        raise CheckFailed(
            f"the judge cannot score the demo prompts with {'its example settings' if judge.example else 'its defaults'}: {exc}",
            "give the Judge an `example` that returns working settings for a scratch directory.",
        ) from exc


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


# --------------------------------------------------------------------------- running


def _show(tensor: Any) -> str:
    if tensor is None:
        return "None"
    return "[" + ", ".join(f"{v:.4g}" for v in tensor.detach().float().reshape(-1).tolist()) + "]"


def subjects_for(target: Any, host: PluginHost, kind: str | None = None) -> list[Subject]:
    """Resolve a plugin name, a component name, or a component object into subjects to check."""
    if not isinstance(target, str):
        for kind_name, cls in COMPONENT_TYPES.items():
            if isinstance(target, cls):
                return [Subject(kind_name, target, host)]
        raise TypeError(f"cannot check {target!r}: expected a name or a molting.Stage/Loss/Judge/Dataset")
    kinds = [kind] if kind else list(KINDS)
    found = [Subject(k, host.components[k][target].component, host, host.components[k][target])
             for k in kinds if target in host.components[k]]
    if found:
        return found
    plugin = host.plugins.get(target)
    if plugin is not None:
        if plugin.status != "ok":
            from molting.errors import PluginError

            raise PluginError(f"plugin {target!r} ({plugin.source}) is {plugin.status}: {plugin.error}")
        return plugin_subjects(target, host)
    from molting.errors import PluginError

    raise PluginError(
        f"no installed plugin or component named {target!r}. "
        + "; ".join(host.available(k) for k in KINDS)
    )


def plugin_subjects(plugin: str, host: Any) -> list[Subject]:
    """The components plugin ``plugin`` registered, as check subjects."""
    subjects = []
    for kind_name in host.plugins[plugin].components:
        kind, name = kind_name.split(":", 1)
        subjects.append(Subject(kind, host.components[kind][name].component, host, host.components[kind][name]))
    return subjects


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
        for number, subject in enumerate(subjects_for(target, host, kind)):
            for chk in checks_for(subject.kind, skip_slow):
                if checks is None or chk.name in checks:
                    workdir = Path(scratch) / f"{number}-{chk.name}"
                    workdir.mkdir()
                    results.append(run_check(chk, attrs.evolve(subject, workdir=workdir), expected_failures))
    return results
