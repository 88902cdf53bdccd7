"""The ``openai`` and ``openai-pairwise`` judges: a model behind any OpenAI-compatible endpoint judges.

LLM-as-judge as people run it: a strong model served by vLLM, Ollama,
llama.cpp's server, TGI, ``molting serve`` or a hosted API, named by
``base_url`` (ending in ``/v1``) and ``model``.

``openai`` is pointwise: ``template`` (a rubric) is filled with the question
and the answer and sent as a user message; the score is the first number
``score_pattern`` finds in the reply (by default after "Score:"), which must
lie in ``[min_score, max_score]``. ``openai-pairwise`` fills its template
with the question and two answers, A and B, reads the verdict letter, and
asks in both orders: the first (0) or second (1) answer when the orders
agree, undecided (-1) when they do not.

With ``reference_column`` the data's column of that name (a person's real
reply, a gold answer) fills ``{reference}``, and the default templates
become the reference-guided ones ("which reply is closer to the reference").

Calls go through :class:`molting.openai_api.Client`: ``concurrency``
requests at once, ``timeout`` seconds each, ``max_retries`` retries with
backoff on 429, 5xx, timeouts and dropped connections. A call that still
fails, or a reply with no score in it, is a judgement not made
(:class:`molting.judging.Failed`): the run's ``judge_on_error`` says whether
it stops the run (the default), is left out, or scores 0. The API key is
read from the environment variable ``api_key_env`` names; settings hold only
that name. Scores are cached per prompt and answer (``cache: false`` turns
that off), so a completion sampled twice costs one call.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import attrs

import molting
from molting.components import Judge
from molting.errors import ConfigError
from molting.judging import Failed, number_setting, text_of
from molting.openai_api import Endpoint

RUBRIC = (
    "Rate how well the answer below answers the question: correct, helpful and clear.\n\n"
    "Question: {question}\n\nAnswer: {answer}\n\n"
    "Give a score from 1 (useless) to 10 (perfect). Reply with 'Score: N' and nothing else."
)
RUBRIC_WITH_REFERENCE = (
    "Here is a message, the reply a person actually wrote to it, and a candidate reply. Rate how close the "
    "candidate is to how this person answered: content, tone, length and style.\n\n"
    "Message: {question}\n\nThe person's reply: {reference}\n\nCandidate reply: {answer}\n\n"
    "Give a score from 1 (nothing like it) to 10 (could be theirs). Reply with 'Score: N' and nothing else."
)
PAIRWISE = (
    "Here is a question and two answers to it, A and B. Which answer is better: more correct, more helpful and "
    "clearer?\n\nQuestion: {question}\n\nAnswer A: {answer_a}\n\nAnswer B: {answer_b}\n\n"
    "Reply with one letter, A or B."
)
PAIRWISE_WITH_REFERENCE = (
    "Here is a message, the reply a person actually wrote to it, and two candidate replies, A and B. Which "
    "candidate is closer to how this person answered: content, tone, length and style?\n\n"
    "Message: {question}\n\nThe person's reply: {reference}\n\nCandidate A: {answer_a}\n\nCandidate B: {answer_b}\n\n"
    "Reply with one letter, A or B."
)
_PARSE_FAILURES: dict[Any, int] = {}


def _text_or_none(judge: str):
    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"judge {judge!r}: setting {attribute.name} must be a non-empty string, got {value!r}")
    return validate


def _pattern(judge: str):
    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        try:
            compiled = re.compile(value)
        except (re.error, TypeError) as exc:
            raise ValueError(f"judge {judge!r}: setting {attribute.name} is not a regular expression: {exc}") from None
        if compiled.groups != 1:
            raise ValueError(f"judge {judge!r}: setting {attribute.name} must have exactly one group (the value)")
    return validate


@attrs.frozen
class _JudgeRequest(Endpoint):
    """What both judges send besides the endpoint (``base_url``, ``model``, ``api_key_env``, ``timeout``,
    ``max_retries``, ``backoff``, ``concurrency``: :class:`molting.openai_api.Endpoint`)."""

    reference_column: str | None = attrs.field(default=None, validator=_text_or_none("openai"))
    """The data column whose text fills ``{reference}`` (a person's real reply, a gold answer); None: none."""
    template: str | None = attrs.field(default=None, validator=_text_or_none("openai"))
    """The judging prompt; None: the built-in one (with or without a reference)."""
    system: str | None = attrs.field(default=None, validator=_text_or_none("openai"))
    """A system message before the judging prompt."""
    max_tokens: int = attrs.field(default=16, validator=number_setting("openai", 1, integer=True))
    temperature: float = attrs.field(default=0.0, validator=number_setting("openai", 0))
    cache: bool = True
    """Keep scores per prompt and answer for the run (an answer sampled twice costs one call)."""


@attrs.frozen
class OpenAIJudgeParams(_JudgeRequest):
    """Settings of the ``openai`` judge (``judge_args: {openai: {base_url: ..., model: ...}}``)."""

    score_pattern: str = attrs.field(default=r"(?i)score\s*[:=]?\s*(-?\d+(?:\.\d+)?)", validator=_pattern("openai"))
    """Where the score is in the reply: a regular expression whose one group is the number."""
    min_score: float = attrs.field(default=1.0, validator=number_setting("openai", float("-inf")))
    max_score: float = attrs.field(default=10.0, validator=number_setting("openai", float("-inf")))
    """A score outside [min_score, max_score] is a reply that could not be read."""

    def __attrs_post_init__(self) -> None:
        if self.min_score >= self.max_score:
            raise ValueError(f"judge 'openai': min_score {self.min_score:g} must be below max_score {self.max_score:g}")


@attrs.frozen
class OpenAIPairwiseParams(_JudgeRequest):
    """Settings of the ``openai-pairwise`` judge."""

    verdict_pattern: str = attrs.field(default=r"\b([AB])\b", validator=_pattern("openai-pairwise"))
    """Where the verdict is in the reply: a regular expression whose one group is A or B."""


def _client(name: str, params: Any) -> Any:
    from molting.openai_api import client_for

    return client_for(Endpoint.of(params), f"judge {name!r}")


def _references(name: str, params: Any, columns: Mapping[str, Sequence[Any]], count: int) -> list[str | None]:
    if params.reference_column is None:
        return [None] * count
    if params.reference_column not in columns:
        raise ConfigError(f"judge {name!r}: reference_column {params.reference_column!r} is not a column of the data "
                          f"(its columns: {', '.join(sorted(columns)) or 'only prompt'})")
    return [text_of(value).strip() for value in columns[params.reference_column]]


def _message(params: Any, default: str, with_reference: str, fields: Mapping[str, Any]) -> list[dict[str, str]]:
    """The judging request's messages: ``template`` (or the default for with/without a reference), filled."""
    text = params.template or (with_reference if params.reference_column else default)
    for key, value in fields.items():
        text = text.replace("{" + key + "}", text_of(value).strip())
    system = [{"role": "system", "content": params.system}] if params.system else []
    return system + [{"role": "user", "content": text}]


def _body(params: Any, messages: list[dict[str, str]]) -> dict[str, Any]:
    return {"messages": messages, "max_tokens": params.max_tokens, "temperature": params.temperature}


def _check_template(name: str, params: Any, needed: tuple[str, ...]) -> None:
    if params.template is None:
        return
    wanted = needed + (("{reference}",) if params.reference_column else ())
    missing = [p for p in wanted if p not in params.template]
    if missing:
        raise ConfigError(f"judge {name!r}: template lacks {', '.join(missing)}; it must contain {', '.join(wanted)}")


def score_answers(prompts: list[Any], completions: list[Any], params: Any, **columns: Any) -> list[float | Failed]:
    """The rubric's score of each completion, or :class:`Failed` where the call failed or no score was read."""
    name = "openai"
    _check_template(name, params, ("{question}", "{answer}"))
    client = _client(name, params)
    references = _references(name, params, columns, len(prompts))
    bodies = [_body(params, _message(params, RUBRIC, RUBRIC_WITH_REFERENCE,
                                     {"question": p, "answer": c, "reference": r or ""}))
              for p, c, r in zip(prompts, completions, references)]
    return [_read_score(params, reply, client.endpoint) for reply in client.chat_many(bodies)]


def _read_score(params: Any, reply: Any, endpoint: Any) -> float | Failed:
    if not hasattr(reply, "texts"):  # a CallFailed
        return Failed(reply.reason)
    found = re.search(params.score_pattern, reply.texts[0])
    value = float(found.group(1)) if found else None
    if value is None or not params.min_score <= value <= params.max_score:
        _PARSE_FAILURES[endpoint] = _PARSE_FAILURES.get(endpoint, 0) + 1
        return Failed(f"the reply {reply.texts[0][:80]!r} holds no score from {params.min_score:g} to "
                      f"{params.max_score:g} (score_pattern {params.score_pattern!r})")
    return value


def pairwise_verdicts(prompts: list[Any], completions: list[Sequence[Any]], params: Any,
                      **columns: Any) -> list[int | Failed]:
    """0 or 1 (the better answer of each pair) when both orders agree, -1 when they do not."""
    name = "openai-pairwise"
    _check_template(name, params, ("{question}", "{answer_a}", "{answer_b}"))
    client = _client(name, params)
    references = _references(name, params, columns, len(prompts))
    bodies = []
    for index, (prompt, pair, reference) in enumerate(zip(prompts, completions, references)):
        if isinstance(pair, (str, bytes)) or len(pair) != 2:
            raise ValueError(f"judge {name!r} compares pairs of completions; item {index} is {pair!r}")
        for a, b in (pair, pair[::-1]):
            fields = {"question": prompt, "answer_a": a, "answer_b": b, "reference": reference or ""}
            bodies.append(_body(params, _message(params, PAIRWISE, PAIRWISE_WITH_REFERENCE, fields)))
    letters = [_read_letter(params, reply, client.endpoint) for reply in client.chat_many(bodies)]
    return [_verdict(letters[2 * i], letters[2 * i + 1]) for i in range(len(prompts))]


def _read_letter(params: Any, reply: Any, endpoint: Any) -> str | Failed:
    if not hasattr(reply, "texts"):
        return Failed(reply.reason)
    found = re.search(params.verdict_pattern, reply.texts[0])
    if not found or found.group(1) not in ("A", "B"):
        _PARSE_FAILURES[endpoint] = _PARSE_FAILURES.get(endpoint, 0) + 1
        return Failed(f"the reply {reply.texts[0][:80]!r} names neither A nor B (verdict_pattern "
                      f"{params.verdict_pattern!r})")
    return found.group(1)


def _verdict(in_order: str | Failed, swapped: str | Failed) -> int | Failed:
    """The first order shows (first, second) as (A, B); the second shows them as (B, A)."""
    for letter in (in_order, swapped):
        if isinstance(letter, Failed):
            return letter
    first_wins = (in_order == "A", swapped == "B")
    return 0 if all(first_wins) else 1 if not any(first_wins) else -1


def _stats(name: str):
    def stats(params: Any) -> dict[str, float]:
        client = _client(name, params)
        return {**client.stats.as_metrics(), "parse_failures": _PARSE_FAILURES.get(client.endpoint, 0)}
    return stats


def _pointwise_example(workdir: Any) -> dict[str, Any]:
    """For the conformance checks: the demo model served in this process. It cannot grade, so the rubric is a
    demo question after the answer and the score is the number the model replies with: the checks exercise the
    HTTP path and the contract, not judgement."""
    from molting.serve import demo_server

    server = demo_server()
    return {"base_url": server.url, "model": server.name, "template": "{question}{answer}\nQ: What is 1 + 1?\nA:",
            "score_pattern": r"(\d+)", "min_score": 0, "max_score": 1e9, "max_tokens": 12}


def _pairwise_example(workdir: Any) -> dict[str, Any]:
    """As :func:`_pointwise_example`: the demo model always starts with "Arr", read as A, so it is undecided."""
    from molting.serve import demo_server

    server = demo_server()
    return {"base_url": server.url, "model": server.name, "verdict_pattern": r"(A)rr", "max_tokens": 4,
            "template": "{question}{answer_a}{answer_b}\nQ: What is 1 + 1?\nA:"}


@molting.hookimpl
def molting_register_judges(register):
    register(Judge(name="openai", score=score_answers, params=OpenAIJudgeParams, stats=_stats("openai"),
                   example=_pointwise_example,
                   description="A served model (any OpenAI-compatible endpoint) scores each answer by a rubric."))
    register(Judge(name="openai-pairwise", score=pairwise_verdicts, params=OpenAIPairwiseParams, kind="pairwise",
                   stats=_stats("openai-pairwise"), example=_pairwise_example,
                   description="A served model (any OpenAI-compatible endpoint) picks the better of two answers."))
