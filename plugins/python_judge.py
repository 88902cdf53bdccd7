"""The ``python`` judge: scores from a function of your own, named ``module:function``.

The function is called as trl calls a reward function, with keyword
arguments: ``function(prompts=..., completions=..., **columns)``, where
``columns`` are the data's other columns (one list per column, aligned with
``prompts``); a function without ``**kwargs`` receives only the columns it
names. It returns one float per completion. It may be ``async def``. For
example, in ``my_rewards.py`` next to where you run ``molting``::

    def short(prompts, completions, **columns):
        return [-len(c) / 100 for c in completions]

    judge_args: {python: {function: "my_rewards:short"}}

The current directory is importable. The function runs with a time limit
(``timeout`` seconds, 60 by default; 0: none); running over it is an error,
as is any exception the function raises, a wrong number of scores or a
``None`` or NaN score: the run stops with a :class:`~molting.errors.JudgeError`
naming the judge and the data row, never scoring the completion 0 in
silence. Scores are cached like any deterministic judge's; set ``cache: false``
for a function whose scores vary from call to call.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import attrs

import molting
from molting.components import Judge
from molting.errors import ConfigError
from molting.judging import number_setting

NAME = "python"
FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _check_function(instance: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and not (isinstance(value, str) and FUNCTION.match(value)):
        raise ValueError(
            f"judge {NAME!r}: setting function must be 'module:function' (e.g. 'my_rewards:short'), got {value!r}"
        )


@attrs.frozen
class PythonParams:
    """Settings of the ``python`` judge (``judge_args: {python: {...}}``)."""

    function: str | None = attrs.field(default=None, validator=_check_function)
    """The function to call, as 'module:function' (the module importable, e.g. a file in the current directory)."""
    timeout: float = attrs.field(default=60.0, validator=number_setting(NAME))
    """Seconds one call may take before it is an error; 0: no limit (the function runs in the calling thread)."""
    cache: bool = True
    """Reuse the scores of a prompt, completion and columns seen before; false for a function that varies."""


def load_function(spec: str | None) -> Callable[..., Any]:
    """The callable ``module:function`` names, imported with the current directory on the path."""
    if spec is None:
        raise ConfigError(
            f"judge {NAME!r} needs the function to call: judge_args: {{{NAME}: {{function: 'module:function'}}}} "
            "in the recipe (the module importable, e.g. my_rewards.py in the current directory)"
        )
    module_name, _, attribute = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    if module_name not in sys.modules:
        importlib.invalidate_caches()  # a module written since the last import is found
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"judge {NAME!r} cannot import {spec!r}: {type(exc).__name__}: {exc} (looked in the current directory "
            f"{cwd} and the installed packages)"
        ) from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"judge {NAME!r}: module {module_name!r} has no {attribute!r} (function {spec!r})") from None
    if not callable(target):
        raise ConfigError(f"judge {NAME!r}: {spec!r} is a {type(target).__name__}, not a function")
    return target


def _arguments(function: Callable[..., Any], prompts: list[Any], completions: list[Any],
               columns: dict[str, list[Any]]) -> dict[str, Any]:
    """trl's keyword arguments, less the columns a function without ``**kwargs`` does not name."""
    arguments = {"prompts": prompts, "completions": completions, **columns}
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return arguments
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return arguments
    return {k: v for k, v in arguments.items() if k in parameters}


def _call(function: Callable[..., Any], arguments: dict[str, Any], timeout: float, label: str) -> Any:
    """Call ``function`` (awaiting it if it is a coroutine function); a ``TimeoutError`` after ``timeout`` s."""
    if not timeout:
        result = function(**arguments)
        if inspect.isawaitable(result):
            from molting.judging import run_coroutine

            result = run_coroutine(result)
        return result

    import asyncio
    import threading

    outcome: dict[str, Any] = {}

    async def wait(awaitable: Any) -> Any:
        task = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:  # cancelled, not left running
            outcome["late"] = True
            task.cancel()
            return None
        return task.result()

    def target() -> None:
        try:
            result = function(**arguments)
            outcome["value"] = asyncio.run(wait(result)) if inspect.isawaitable(result) else result
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    # a daemon thread: a function that never returns cannot keep the process alive
    thread = threading.Thread(target=target, name="molting-python-judge", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive() or outcome.get("late"):
        raise TimeoutError(
            f"{label} returned no scores within timeout={timeout:g} s "
            f"(raise it with judge_args: {{{NAME}: {{timeout: SECONDS}}}})"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def python_scores(prompts: list[Any], completions: list[Any], params: PythonParams, **columns: list[Any]) -> list[Any]:
    """The scores ``params.function`` returns for these completions (checked by :class:`molting.judging.Scorer`)."""
    function = load_function(params.function)
    result = _call(function, _arguments(function, prompts, completions, columns), params.timeout, params.function)
    if result is None or isinstance(result, (str, bytes, dict)) or not hasattr(result, "__iter__"):
        raise TypeError(
            f"{params.function} returned {type(result).__name__}; it must return a list with one float per completion"
        )
    return list(result)


def length_score(prompts: list[Any], completions: list[Any], **columns: list[Any]) -> list[float]:
    """An example function: each completion's length in characters (``function: molting.plugins.python_judge:length_score``)."""
    from molting.judging import text_of

    return [float(len(text_of(c))) for c in completions]


def example_settings(workdir: Path) -> dict[str, Any]:
    """Settings that let the conformance checks score with this judge: the example function."""
    return {"function": f"{__name__}:length_score"}


@molting.hookimpl
def molting_register_judges(register):
    register(
        Judge(
            name=NAME,
            score=python_scores,
            description="Scores from your own function, 'module:function' (prompts, completions, **columns), sync or async.",
            params=PythonParams,
            example=example_settings,
        )
    )
