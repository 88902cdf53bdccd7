"""Scoring completions with judges: resolution, weights, caching and errors a user can act on.

Online stages (PPO, GRPO, on-policy pair sampling) never call a judge's
``score`` directly; they build a :class:`Scorer` from the run's judges
(``--judge NAME[=WEIGHT]``, ``judges:`` in the recipe, else the stage's
default) and their settings (``judge_args: {NAME: {...}}``). The scorer

* passes the data's other columns to judges whose ``score`` takes ``**columns``;
* awaits a ``score`` that is a coroutine function;
* caches the scores of deterministic judges per (judge, settings, prompt,
  completion, columns), so a completion sampled twice is judged once (a
  judge whose settings have a ``cache`` field set to false is not cached);
* turns an exception, a wrong number of scores, or a score that is not a
  finite number into a :class:`~molting.errors.JudgeError` naming the judge
  and the prompt's index in the data. A :class:`~molting.errors.MoltingError`
  the judge raises itself (a missing setting or column, a model that cannot
  load) already says what to fix and passes through unchanged.
* applies the run's ``judge_on_error`` to the judgements a judge could not
  make (it returns a :class:`Failed` in their place: a server that kept
  failing, an answer with no score in it): ``fail`` stops the run with the
  reason, ``zero`` scores them 0 (a pairwise judge: undecided), ``skip``
  scores them NaN (a pairwise judge: undecided), which the stages leave out;
  :meth:`Scorer.metrics` counts them.

See ``docs/judges.md`` for the built-in judges and how to write one.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import attrs

from molting.components import Judge
from molting.errors import ConfigError, JudgeError, MoltingError

MAX_CACHED = 200_000
"""Scores a Scorer keeps (least recently used dropped first): online runs rarely sample a completion twice."""

ON_ERROR = ("fail", "skip", "zero")
"""What a judgement the judge could not make does to the run (``judge_on_error``)."""

ARTIFACT = "molting_artifact"
"""Metadata key on a judge's params field: fill it with this kind of output of an earlier step when unset."""


@attrs.frozen
class Failed:
    """In a judge's results, a judgement it could not make, and why (the run's ``judge_on_error`` decides)."""

    reason: str


@attrs.frozen
class JudgeSpec:
    """A judge as a run uses it: the component, its weight and its settings."""

    name: str
    judge: Judge
    weight: float
    params: Any


def resolve_judges(host: Any, config: Any, default: Mapping[str, float], artifacts: Mapping[str, Path] | None = None,
                   stage: str = "this stage", required: bool = True) -> list[JudgeSpec]:
    """The run's judges (``config.judges``, else ``default``) with their settings from ``config.judge_args``;
    none is an error unless not ``required`` (an environment's episodes bring their own reward).

    A params field declared with ``metadata={"molting_artifact": "reward-model"}``
    and left unset takes the output of the run's latest earlier step of that
    kind: so the ``reward-model`` judge of ``--plugin sft --plugin
    reward-model --plugin ppo`` scores with the reward model just trained.
    """
    weights = dict(config.judges or default)
    if not weights and not required:
        return []
    if not weights:
        raise ConfigError(f"{stage} scores samples with judges, but none was given: use --judge NAME (see `molting plugins`)")
    unused = sorted(set(config.judge_args) - set(weights) - set(getattr(config, "eval_judges", None) or {}))
    if unused:
        raise ConfigError(
            f"judge_args gives settings for {', '.join(unused)}, which the run does not use (its judges: "
            f"{', '.join(weights)})"
        )
    specs = []
    for name, weight in weights.items():
        judge = host.get("judge", name)
        if not isinstance(config.judge_args.get(name) or {}, Mapping):
            raise ConfigError(f"judge_args for {name!r} must be a mapping of settings, got {config.judge_args[name]!r}")
        args = with_artifacts(judge, config.judge_args.get(name) or {}, artifacts)
        try:
            params = judge.params(**args)
        except (TypeError, ValueError) as exc:
            valid = ", ".join(f.name for f in attrs.fields(judge.params)) or "none"
            raise ConfigError(f"invalid judge_args for judge {name!r}: {exc} (its settings: {valid})") from exc
        specs.append(JudgeSpec(name, judge, float(weight), params))
    return specs


def with_artifacts(judge: Any, args: Mapping[str, Any], artifacts: Mapping[str, Path] | None) -> dict[str, Any]:
    """A judge's settings with each field marked ``molting_artifact`` that is unset filled from an earlier step."""
    args = {str(k).replace("-", "_"): v for k, v in args.items()}
    for field in attrs.fields(judge.params):
        kind = field.metadata.get(ARTIFACT)
        if kind and args.get(field.name) is None and artifacts and kind in artifacts:
            args[field.name] = str(artifacts[kind])
    return args


def number_setting(judge: str, minimum: float = 0.0, strict: bool = False, integer: bool = False):
    """An attrs validator for a judge's numeric setting: a finite number (an int if ``integer``) ≥ or > ``minimum``."""
    bound = f"{'>' if strict else '≥'} {minimum:g}"
    expected = f"{'an integer' if integer else 'a number'} {bound}"

    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and (value > minimum if strict else value >= minimum)):
            raise ValueError(f"judge {judge!r}: setting {attribute.name} must be {expected}, got {value!r}")

    return validate


def judged_mean(values: Sequence[float]) -> float:
    """The mean of the scores that were judged: a NaN (a judgement skipped, ``judge_on_error: skip``) takes no
    part; NaN when none was judged."""
    judged = [v for v in values if not math.isnan(v)]
    return sum(judged) / len(judged) if judged else math.nan


def data_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """The columns other than ``prompt`` of ``rows`` (the first row's keys), one value per row, for ``Scorer``.

    A row without one of them gives ``None`` there.
    """
    return {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"}


class Scorer:
    """Weighted scores of completions from one or more pointwise judges, cached and checked.

    With ``pairwise=True`` it also holds pairwise judges, for :meth:`score`
    with pairs of completions (their verdicts are cached the same way).
    """

    def __init__(self, specs: Sequence[JudgeSpec], cache: bool = True, pairwise: bool = False,
                 on_error: str = "fail") -> None:
        if on_error not in ON_ERROR:
            raise ConfigError(f"judge_on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        for spec in specs:
            if spec.judge.kind != "pointwise" and not pairwise:
                raise ConfigError(
                    f"judge {spec.name!r} is pairwise (it picks the better of two answers); this stage needs "
                    "pointwise judges, which score each answer"
                )
        self.specs = list(specs)
        self.use_cache = cache
        self.cache: OrderedDict[tuple, float] = OrderedDict()  # least recently used first, at most MAX_CACHED
        self.hits = 0
        self.misses = 0
        self.on_error = on_error
        self.failed: dict[str, int] = {spec.name: 0 for spec in specs}  # judgements each judge could not make
        self.first_failure: dict[str, str] = {}  # each judge's first reason, for the run's summary

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, Sequence[Any]] | None = None,
                 rows: Sequence[int] | None = None) -> tuple[list[float], dict[str, list[float]]]:
        """``(weighted total per completion, {judge name: its scores})``.

        ``columns`` holds the data's other columns aligned with ``prompts``;
        ``rows`` the data row of each prompt, used in error messages.
        """
        per_judge = {spec.name: self.score(spec, prompts, completions, columns, rows) for spec in self.specs}
        totals = [sum(spec.weight * per_judge[spec.name][i] for spec in self.specs) for i in range(len(prompts))]
        return totals, per_judge

    def score(self, spec: JudgeSpec, prompts: Sequence[Any], completions: Sequence[Any],
              columns: Mapping[str, Sequence[Any]] | None = None, rows: Sequence[int] | None = None) -> list[float]:
        """One judge's scores, from the cache where it can (a completion repeated in the batch is judged once)."""
        columns = dict(columns or {})
        rows = list(rows) if rows is not None else list(range(len(prompts)))
        _check_lengths(spec, prompts, completions, columns, rows)
        cacheable = self.use_cache and spec.judge.deterministic and getattr(spec.params, "cache", True) is not False
        settings = repr(attrs.asdict(spec.params)) if attrs.has(type(spec.params)) else repr(spec.params)
        keys = [
            (spec.name, settings, _freeze(p), _freeze(c), tuple((k, _freeze(v[i])) for k, v in sorted(columns.items())))
            for i, (p, c) in enumerate(zip(prompts, completions))
        ]
        pending: dict[Any, int] = {}  # what to judge → its first position in the batch
        for i, key in enumerate(keys):
            if not (cacheable and key in self.cache):
                pending.setdefault(key if cacheable else i, i)
        todo = sorted(pending.values())
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        fresh: dict[int, float] = {}
        if todo:
            sub_columns = {k: [v[i] for i in todo] for k, v in columns.items()}
            values = call_judge(spec, [prompts[i] for i in todo], [completions[i] for i in todo], sub_columns,
                                [rows[i] for i in todo])
            fresh, failed = self._settle(spec, dict(zip(todo, values)), rows, prompts)
            if cacheable:
                self.cache.update({keys[i]: v for i, v in fresh.items() if i not in failed})
                while len(self.cache) > MAX_CACHED:
                    self.cache.popitem(last=False)
        for i in range(len(keys)):
            if i not in fresh and keys[i] in self.cache:
                self.cache.move_to_end(keys[i])
        judged_at = [pending.get(keys[i], i) if cacheable else i for i in range(len(keys))]  # a repeat: its first
        return [fresh[j] if j in fresh else self.cache[keys[i]] for i, j in enumerate(judged_at)]

    def _settle(self, spec: JudgeSpec, fresh: dict[int, Any], rows: Sequence[int],
                prompts: Sequence[Any]) -> tuple[dict[int, float], set[int]]:
        """``fresh`` with each :class:`Failed` judgement replaced as ``on_error`` says (and counted), and where
        they were (never cached: the next time may work)."""
        failed = {i for i, value in fresh.items() if isinstance(value, Failed)}
        if not failed:
            return fresh, failed
        self.failed[spec.name] += len(failed)
        first = min(failed)
        self.first_failure.setdefault(spec.name, f"{fresh[first].reason} (data row {rows[first]})")
        if self.on_error == "fail":
            raise JudgeError(
                f"judge {spec.name!r} could not judge the completion for the prompt at data row {rows[first]} "
                f"({_short(prompts[first])}): {fresh[first].reason}. judge_on_error is fail; with skip or zero "
                "(--judge-on-error) the run goes on without such judgements and counts them")
        pairwise = spec.judge.kind == "pairwise"
        stand_in = -1 if pairwise else 0.0 if self.on_error == "zero" else math.nan
        return {i: stand_in if i in failed else value for i, value in fresh.items()}, failed

    def metrics(self) -> dict[str, float]:
        """The judges' counters: judgements that could not be made (``judge/NAME/failed``, for a judge that
        failed or reports ``Judge.stats``) and what each judge reports of itself (an HTTP judge's latency and
        retries), as ``judge/NAME/KEY``."""
        metrics: dict[str, float] = {}
        for spec in self.specs:
            if self.failed[spec.name] or spec.judge.stats is not None:
                metrics[f"judge/{spec.name}/failed"] = self.failed[spec.name]
            if spec.judge.stats is not None:
                metrics.update({f"judge/{spec.name}/{k}": float(v) for k, v in spec.judge.stats(spec.params).items()})
        return metrics


def call_judge(spec: JudgeSpec, prompts: list[str], completions: list[Any], columns: Mapping[str, list[Any]],
               rows: list[int]) -> list[float]:
    """Call a judge once on a batch and check what it returns (see :class:`Scorer`)."""
    try:
        result = _invoke(spec, prompts, completions, columns)
    except MoltingError:
        raise  # the judge's own error (a missing setting or column): it already names what to fix
    except TimeoutError as exc:  # retrying each prompt alone would take as long again, per prompt
        raise JudgeError(
            f"judge {spec.name!r} timed out: {str(exc) or 'no scores in time'} — on the prompts at data rows {_span(rows)}"
        ) from exc
    except Exception as exc:
        raise JudgeError(
            f"judge {spec.name!r} raised {type(exc).__name__}: {exc} — {_culprit(spec, prompts, completions, columns, rows)}"
        ) from exc
    try:
        values = list(result)
    except TypeError:
        raise JudgeError(
            f"judge {spec.name!r} returned {type(result).__name__}, not a list of scores, for the prompts at data rows "
            f"{_span(rows)}"
        ) from None
    if len(values) != len(prompts):
        raise JudgeError(
            f"judge {spec.name!r} returned {len(values)} scores for {len(prompts)} completions (the prompts at data rows "
            f"{_span(rows)}); a judge returns exactly one score per completion"
        )
    pairwise = spec.judge.kind == "pairwise"
    checked = []
    for value, row, prompt in zip(values, rows, prompts):
        if isinstance(value, Failed):
            checked.append(value)
            continue
        number = _as_number(value)
        if number is None or not math.isfinite(number) or (pairwise and number not in (-1, 0, 1)):
            expected = "0, 1 or -1 (undecided)" if pairwise else "a finite number"
            raise JudgeError(
                f"judge {spec.name!r} returned {value!r} for the prompt at data row {row} ({_short(prompt)}); "
                f"expected {expected}"
            )
        checked.append(int(number) if pairwise else float(number))
    return checked


def _invoke(spec: JudgeSpec, prompts: list[str], completions: list[Any], columns: Mapping[str, list[Any]]) -> Any:
    score = spec.judge.score
    # a column named like score's own arguments would clash with them; judges never need those
    kwargs = {k: v for k, v in columns.items() if k not in _POSITIONAL} if _takes_columns(score) else {}
    result = score(prompts, completions, spec.params, **kwargs)
    if inspect.isawaitable(result):
        result = run_coroutine(result)
    return result


def run_coroutine(awaitable: Any) -> Any:
    """The result of ``awaitable``, from synchronous code: in a new event loop, or in a thread when one runs
    already (a notebook). How an async judge is awaited."""
    import asyncio  # here, not at the top: every judge plugin imports this module at start-up

    async def wait() -> Any:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # already inside an event loop (a notebook)
        return pool.submit(asyncio.run, wait()).result()


_POSITIONAL = ("prompts", "completions", "params")


def _takes_columns(function: Any) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _culprit(spec: JudgeSpec, prompts: list[str], completions: list[Any], columns: Mapping[str, list[Any]],
             rows: list[int]) -> str:
    """Which prompt makes the judge raise: each one is retried alone, for the first that fails.

    When a prompt of another data row fails alone too, the failure is not the
    data's (a bug in the judge, a model that does not load) and the message
    says so.
    """
    def fails(i: int) -> bool:
        try:
            _invoke(spec, prompts[i : i + 1], completions[i : i + 1], {k: v[i : i + 1] for k, v in columns.items()})
        except Exception:
            return True
        return False

    if len(prompts) > 1:
        for i in range(len(prompts)):
            if fails(i):
                other = next((j for j in reversed(range(len(prompts))) if rows[j] != rows[i]), None)
                if other is not None and fails(other):
                    i, last = sorted((i, other))
                    return (f"on every prompt tried (data rows {rows[i]} and {rows[last]} among them): the judge fails "
                            "whatever the data, so look at the judge and its settings")
                return f"on the prompt at data row {rows[i]} ({_short(prompts[i])})"
    if len(prompts) == 1:
        return f"on the prompt at data row {rows[0]} ({_short(prompts[0])})"
    return f"on the prompts at data rows {_span(rows)}"


def _check_lengths(spec: JudgeSpec, prompts: Sequence[Any], completions: Sequence[Any],
                   columns: Mapping[str, Sequence[Any]], rows: Sequence[int]) -> None:
    """The caller's lists must align: one completion (or pair), one value per column and one row per prompt."""
    sizes = {"completions": len(completions), "rows": len(rows), **{f"column {k!r}": len(v) for k, v in columns.items()}}
    wrong = {name: n for name, n in sizes.items() if n != len(prompts)}
    if wrong:
        raise ValueError(
            f"scoring with judge {spec.name!r}: {len(prompts)} prompts but "
            + ", ".join(f"{n} {name}" for name, n in wrong.items())
            + "; every list must have one entry per prompt"
        )


def _freeze(value: Any) -> Any:
    """A hashable stand-in for a cache key: message lists and dicts become tuples."""
    if isinstance(value, (str, type(None))):
        return value
    if isinstance(value, (int, float)):  # 1, 1.0 and True are equal keys to a dict, but not to every judge
        return (type(value).__name__, value)
    if isinstance(value, Mapping):
        return ("{}", tuple(sorted((str(k), _freeze(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("[]", tuple(_freeze(v) for v in value))
    return ("repr", type(value).__name__, repr(value))


def text_of(value: Any) -> str:
    """The text of a prompt or completion: a string as it is, a message list as its messages' contents.

    For judges that read text (a rule, a judging prompt); a conversational
    completion (``[{"role": "assistant", "content": ...}]``) becomes its content.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return text_of(value.get("content", ""))
    if isinstance(value, (list, tuple)):
        return "\n".join(text_of(v) for v in value)
    return "" if value is None else str(value)


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _span(rows: Sequence[int]) -> str:
    rows = list(rows)
    if not rows:
        return "(none)"
    if rows == list(range(rows[0], rows[0] + len(rows))) and len(rows) > 2:
        return f"{rows[0]}–{rows[-1]}"
    return ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")


def _short(text: Any) -> str:
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:57] + "...'"
