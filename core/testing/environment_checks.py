"""The conformance checks of environments and tool-call parsers (registered with :func:`molting.testing.checks.check`).

An environment is checked on a few of its rows (its ``default_data``'s, else
``example_rows()``), with its ``example`` settings: an episode starts the
same from the same row and seed; ``start`` and ``step`` keep the contract's
types; a model turn written badly (junk, a call that does not parse, an
unknown tool, nothing at all) is answered with an observation, never an
exception; episodes the built-in model plays end within the turn limit; and
the same episodes come out whether the rollout is driven from plain code or
from inside a running event loop (a notebook), so sync and async
environments both work. A parser must read back the calls it renders, leave
plain text alone and never raise on what a model might write.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from typing import Any

from molting.testing.checks import CheckFailed, CheckSkipped, Subject, _one_thread, check

_ROWS = 4


# --------------------------------------------------------------------------- environments


def _rows(subject: Subject) -> list[dict[str, Any]]:
    environment = subject.component
    if environment.example_rows is not None:
        return list(environment.example_rows())[:_ROWS]
    if environment.default_data is None:
        raise CheckSkipped(f"{subject.label} names no default_data and no example_rows to start episodes from")
    dataset = subject.host.get("dataset", environment.default_data)
    split = "test" if "test" in dataset.splits else dataset.splits[0]
    return list(dataset.load(split))[:_ROWS]


def _params(subject: Subject) -> Any:
    from molting.environments import EpisodeRunner  # noqa: F401 (the toolkit must import)

    environment = subject.component
    args = environment.example(subject.workdir) if environment.example is not None else {}
    try:
        return environment.params(**args)
    except Exception as exc:
        raise CheckFailed(f"{subject.label}'s example settings {args!r} do not build its params: {exc}",
                          "give the Environment an `example` that returns working env_args") from exc


def _started(subject: Subject, row: dict[str, Any], seed: int) -> Any:
    from molting.environments import Episode

    environment = subject.component
    try:
        episode = environment.start(row, seed, _params(subject))
        if inspect.isawaitable(episode):
            episode = _run(episode)
    except CheckFailed:
        raise
    except Exception as exc:
        raise CheckFailed(f"{subject.label}.start(row, seed {seed}) raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(episode, Episode):
        raise CheckFailed(f"{subject.label}.start returned {type(episode).__name__}, not a molting.environments.Episode",
                          "subclass molting.environments.Episode (or ToolEpisode) and return an instance")
    return episode


def _run(awaitable: Any) -> Any:
    async def wait() -> Any:
        return await awaitable

    return asyncio.run(wait())


def _step(subject: Subject, episode: Any, turn: Any) -> Any:
    from molting.environments import Turn

    try:
        answer = episode.step(turn)
        if inspect.isawaitable(answer):
            answer = _run(answer)
    except Exception as exc:
        raise CheckFailed(f"{subject.label}: step() raised {type(exc).__name__} on the model turn {turn.text!r}: {exc}",
                          "answer every model turn, however badly written, with a Turn (an error observation)"
                          ) from exc
    if not isinstance(answer, Turn):
        raise CheckFailed(f"{subject.label}: step() returned {type(answer).__name__}, not a molting.environments.Turn")
    return answer


def _turns() -> list[Any]:
    from molting.environments import ModelTurn
    from molting.tools import ToolCall

    return [
        ModelTurn("The answer is 42.", "The answer is 42."),
        ModelTurn("", ""),
        ModelTurn("}{ <tool_call> ]] \x00 ~~~", "}{ ]] ~~~", malformed=("not valid JSON: }{",)),
        ModelTurn("calling", "calling", tool_calls=(ToolCall("no_such_tool_anywhere", {"x": 1}),)),
        ModelTurn("x" * 2000, "x" * 2000),
    ]


def _describe(turn: Any) -> dict[str, Any]:
    return {"observation": [dict(m) for m in turn.observation], "reward": turn.reward, "done": turn.done}


@check("environment")
def check_env_reset_deterministic(subject: Subject) -> None:
    """An episode starts the same from the same row and seed, and answers the same turn the same way."""
    row = _rows(subject)[0]
    first, second = _started(subject, row, 7), _started(subject, row, 7)
    if first.prompt != second.prompt or [t.__name__ for t in first.tools] != [t.__name__ for t in second.tools]:
        raise CheckFailed(f"{subject.label}: two episodes started from one row with seed 7 differ: prompts "
                          f"{first.prompt!r} and {second.prompt!r}", "draw any randomness from the seed start() gets")
    turn = _turns()[0]
    one, two = _describe(_step(subject, first, turn)), _describe(_step(subject, second, turn))
    if one != two:
        raise CheckFailed(f"{subject.label}: the same turn in two episodes started alike was answered {one} and {two}",
                          "draw any randomness from the seed start() gets")


@check("environment")
def check_env_step_contract(subject: Subject) -> None:
    """start gives an Episode whose prompt is messages, whose tools have schemas, and whose step answers with Turns."""
    from molting.tools import tool_schemas

    for seed, row in enumerate(_rows(subject)):
        episode = _started(subject, row, seed)
        prompt = episode.prompt if episode.prompt is not None else row.get("prompt")
        if not (isinstance(prompt, str) and prompt) and not (
                isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt)):
            raise CheckFailed(f"{subject.label}: the episode of row {seed} has no prompt ({prompt!r})",
                              "set Episode.prompt to messages (or text), or read the row's prompt")
        if episode.tools:
            try:
                tool_schemas(episode.tools, subject.label)
            except Exception as exc:
                raise CheckFailed(str(exc)) from exc
        answer = _step(subject, episode, _turns()[0])
        _check_turn(subject, answer)


def _check_turn(subject: Subject, answer: Any) -> None:
    if not math.isfinite(answer.reward) or not isinstance(answer.done, bool):
        raise CheckFailed(f"{subject.label}: a Turn's reward must be finite and done a bool; got {answer.reward!r}, "
                          f"{answer.done!r}")
    for message in answer.observation:
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise CheckFailed(f"{subject.label}: an observation message needs a role and text content; got {message!r}")
    if not answer.done and not answer.observation:
        raise CheckFailed(f"{subject.label}: a turn that does not end the episode must say something (an empty "
                          "observation leaves the model nothing to answer)")


@check("environment")
def check_env_answers_bad_turns(subject: Subject) -> None:
    """Junk, a call that does not parse, an unknown tool, an empty or very long turn: each gets a Turn, never an exception."""
    row = _rows(subject)[0]
    for turn in _turns():
        _check_turn(subject, _step(subject, _started(subject, row, 0), turn))


def _roll(subject: Subject, inside_a_loop: bool) -> list[Any]:
    from molting import demo
    from molting.environments import RolloutSettings, roll_out
    from molting.models import load_causal_lm
    from molting.sampling import sample
    from molting.tools import parser_for

    environment, rows = subject.component, _rows(subject)
    model, tokenizer = load_causal_lm(demo.demo_model_dir())
    parser = parser_for(subject.host, "auto", tokenizer, required=False)
    settings = RolloutSettings(max_turns=environment.max_turns, max_new_tokens=24, max_episode_tokens=256)
    count = len(rows)

    def play() -> Any:
        return roll_out(sample, model.eval(), tokenizer, environment, _params(subject), rows, list(range(count)),
                        list(range(count)), list(range(count)), settings, parser)

    async def from_a_loop() -> Any:  # a notebook: the caller is inside a running event loop
        return play()

    try:
        with _one_thread():
            samples = _run(from_a_loop()) if inside_a_loop else play()
    except Exception as exc:
        where = " from inside a running event loop" if inside_a_loop else ""
        raise CheckFailed(f"{subject.label}: rolling out episodes with the built-in model{where} raised "
                          f"{type(exc).__name__}: {exc}") from exc
    return samples.episodes


@check("environment")
def check_env_ends_within_turn_limit(subject: Subject) -> None:
    """Episodes the built-in model plays end (done, or cut by a limit) within max_turns, with finite rewards."""
    for record in _roll(subject, inside_a_loop=False):
        if not record.finished or record.turns > subject.component.max_turns or not math.isfinite(record.reward):
            raise CheckFailed(f"{subject.label}: the episode of row {record.row} took {record.turns} turns (limit "
                              f"{subject.component.max_turns}), finished {record.finished}, reward {record.reward}")


@check("environment")
def check_env_sync_and_async(subject: Subject) -> None:
    """The same episodes come out driven from plain code and from inside a running event loop (a notebook)."""
    plain = [(r.ids, r.reward, r.turns) for r in _roll(subject, inside_a_loop=False)]
    looped = [(r.ids, r.reward, r.turns) for r in _roll(subject, inside_a_loop=True)]
    if plain != looped:
        raise CheckFailed(f"{subject.label}: episodes differ when the rollout runs inside an event loop",
                          "do not reach for a global event loop (asyncio.get_event_loop); await in step instead")


# --------------------------------------------------------------------------- tool parsers


def _calls() -> list[Any]:
    from molting.tools import ToolCall

    return [ToolCall("add", {"a": 12, "b": -3.5}), ToolCall("search", {"query": 'say "hi"; then {go}', "tags": ["x", "é"],
                                                                     "options": {"deep": True, "limit": None}})]


@check("tool_parser")
def check_parser_reads_what_it_renders(subject: Subject) -> None:
    """parse(render(calls)) gives the calls back: names and arguments, quotes, braces and unicode included."""
    parser = subject.component
    for calls in (_calls()[:1], _calls()):
        parsed = parser.parse(parser.render(calls))
        if list(parsed.calls) != calls or parsed.malformed:
            raise CheckFailed(f"{subject.label} rendered {calls} as {parser.render(calls)!r} and read back "
                              f"{list(parsed.calls)} (malformed: {list(parsed.malformed)})")


@check("tool_parser")
def check_parser_leaves_plain_text(subject: Subject) -> None:
    """A turn without a call is its text: no calls, nothing malformed."""
    text = "The capital of France is Paris; 2 + 2 = 4."
    parsed = subject.component.parse(text)
    if parsed.calls or parsed.malformed or parsed.content != text:
        raise CheckFailed(f"{subject.label} read {text!r} as {parsed!r}; expected the text back and no calls")


@check("tool_parser")
def check_parser_never_raises(subject: Subject) -> None:
    """Whatever a model writes (a call cut short, junk, nothing) is parsed without an exception."""
    from molting.tools import ParsedTurn

    parser = subject.component
    rendered = parser.render(_calls())
    cut_short = [rendered[: len(rendered) * part // 6] for part in range(1, 6)] + [rendered[:-1]]
    garbled = [rendered.replace('"', ""), rendered.replace(":", ";"), rendered.replace("{", "{{"), rendered + rendered[:5]]
    for text in ("", *cut_short, *garbled, "}{][\x00" * 10, "<tool_call>", "[TOOL_CALLS]", "<|python_tag|>{"):
        try:
            parsed = parser.parse(text)
        except Exception as exc:
            raise CheckFailed(f"{subject.label}.parse({text[:60]!r}) raised {type(exc).__name__}: {exc}",
                              "report a call written wrongly in ParsedTurn.malformed instead of raising") from exc
        if not isinstance(parsed, ParsedTurn):
            raise CheckFailed(f"{subject.label}.parse returned {type(parsed).__name__}, not a molting.tools.ParsedTurn")
    try:
        recognised = parser.recognises("")
    except Exception as exc:
        raise CheckFailed(f"{subject.label}.recognises('') raised {type(exc).__name__}: {exc}") from exc
    if recognised is not False:
        raise CheckFailed(f"{subject.label}.recognises('') is {recognised!r}: an empty template shows no format")
