"""The ``rule`` judge: a completion is right (1.0) or wrong (0.0) against the row's reference answer.

Three modes compare each completion with the data's reference column
(``column``, default ``answer``, else ``solution``), which the judge receives through
``**columns``:

* ``numeric`` (the default): the last number in the completion (``-1,234.5``
  style: a sign, thousands commas and a decimal point are read) equals the
  reference, read the same way, within ``tolerance`` (absolute, or relative
  to the larger of the two). On the demo data (``demo-prompts``) this is the
  correctness of the sum.
* ``exact``: the completion, stripped of surrounding whitespace, equals the
  reference, stripped.
* ``regex``: the completion contains a match of ``pattern`` (``re.search``:
  anywhere; anchor it, ``^...$``, for a whole-completion match; inline flags
  such as ``(?i)`` or ``(?s)`` work). Without ``pattern`` each row's reference
  is the pattern. With ``pattern`` the reference column is not read: a
  format reward.

In the ``numeric`` and ``exact`` modes a ``pattern`` says where the answer
is: the completion's last match of it (its first group, or the whole match
if it has none) is compared instead of the whole completion, e.g.
``pattern: '\\\\boxed\\{(.*?)\\}'``. No match scores 0.0.

A completion given as a message list is judged on its messages' text.
"""

from __future__ import annotations

import math
import re
from typing import Any

import attrs

import molting
from molting.components import Judge
from molting.errors import ConfigError
from molting.judging import number_setting, text_of

NAME = "rule"
MODES = ("numeric", "exact", "regex")

NUMBER = re.compile(r"(?<![\d.])(?:(?<![\w)])-)?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)")
"""A number: an optional minus sign (not after a word, so ``10-3`` reads 3), thousands commas, a decimal part."""


def _check_pattern(instance: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"judge {NAME!r}: setting pattern must be a regular expression (a string), got {value!r}")
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"judge {NAME!r}: setting pattern {value!r} is not a valid regular expression: {exc}") from None


def _check_column(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"judge {NAME!r}: setting column must be the name of a data column, got {value!r}")


@attrs.frozen
class RuleParams:
    """Settings of the ``rule`` judge (``judge_args: {rule: {...}}``)."""

    mode: str = attrs.field(default="numeric", validator=attrs.validators.in_(MODES))
    """numeric: the last number equals the reference; exact: the text equals it; regex: a pattern matches."""
    column: str = attrs.field(default="answer", validator=_check_column)
    """The data column holding each row's reference answer (by default ``answer``, else ``solution``)."""
    pattern: str | None = attrs.field(default=None, validator=_check_pattern)
    """regex mode: the pattern to search for (else each row's reference); numeric/exact: where the answer is."""
    tolerance: float = attrs.field(default=1e-6, validator=number_setting(NAME))
    """numeric mode: the largest absolute difference still counted equal (whole numbers compare exactly)."""


def parse_number(text: str) -> float | None:
    """The last number in ``text`` (``"be 1,234.5, matey"`` → 1234.5), or ``None``."""
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def _reference_number(value: Any, column: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        number = parse_number(text_of(value))
    if number is None or not math.isfinite(number):
        raise ValueError(f"the reference {column!r} is {value!r}, which holds no number (mode numeric)")
    return number


def _answer(completion: str, pattern: str | None) -> str | None:
    """The part of the completion to compare: all of it, or the last match of ``pattern`` (its first group)."""
    if pattern is None:
        return completion
    matches = list(re.finditer(pattern, completion))
    if not matches:
        return None
    last = matches[-1]
    return (last.group(1) or "") if last.re.groups else last.group(0)


def _score_one(completion: Any, reference: Any, params: RuleParams) -> float:
    text = text_of(completion)
    if params.mode == "regex":
        pattern = params.pattern if params.pattern is not None else text_of(reference)
        try:
            return float(re.search(pattern, text) is not None)
        except re.error as exc:
            raise ValueError(f"the reference {params.column!r} is {reference!r}, not a valid regular expression: {exc}")
    answer = _answer(text, params.pattern)
    if answer is None:
        return 0.0
    if params.mode == "exact":
        return float(answer.strip() == text_of(reference).strip())
    expected = _reference_number(reference, params.column)
    got = parse_number(answer)
    if got is None:
        return 0.0
    if got.is_integer() and expected.is_integer():
        return float(got == expected)  # 1000001 is not 1000000, whatever the tolerance
    return float(math.isclose(got, expected, rel_tol=0.0, abs_tol=params.tolerance))


def rule_scores(prompts: list[Any], completions: list[Any], params: RuleParams, **columns: list[Any]) -> list[float]:
    """1.0 for each completion that matches its row's reference (see the module docstring), else 0.0."""
    needs_reference = not (params.mode == "regex" and params.pattern is not None)
    if not needs_reference:
        return [_score_one(c, None, params) for c in completions]
    column = params.column
    if column == "answer" and column not in columns and "solution" in columns:
        column = "solution"  # the default column, as math sets (MATH, NuminaMath) name it
    if column not in columns:
        have = ", ".join(repr(c) for c in sorted(columns)) or "none besides the prompt"
        raise ConfigError(
            f"judge {NAME!r} (mode {params.mode}) compares each completion with the reference column "
            f"{params.column!r}, which the data does not have (its other columns: {have}); add the column to the "
            f"data or name another with judge_args: {{{NAME}: {{column: NAME}}}}"
        )
    references = columns[column]
    for reference in references:
        if reference is None:
            raise ValueError(f"the reference {column!r} is empty (None)")
    return [_score_one(c, r, params) for c, r in zip(completions, references)]


@molting.hookimpl
def molting_register_judges(register):
    register(
        Judge(
            name=NAME,
            score=rule_scores,
            description="1.0 if the completion matches the row's reference answer (numeric, exact or regex), else 0.0.",
            params=RuleParams,
        )
    )
