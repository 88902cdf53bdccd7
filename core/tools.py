"""Tools an episode offers the model: their schemas, the calls parsed from its turns, and running them.

A tool is a plain Python function (or coroutine function) with type hints
and a Google-style docstring; :func:`tool_schemas` turns it into the JSON
schema a chat template's ``tools`` takes (transformers' ``get_json_schema``).
A model writes calls in its family's format; a registered
:class:`molting.ToolParser` (``--tool-parser``, picked from the chat
template by :func:`parser_for`) reads them into :class:`ToolCall` objects.
:func:`run_calls` runs them, each under a timeout, and turns whatever goes
wrong — a call that did not parse, an unknown tool, arguments the function
does not take, a tool that raises or hangs — into an error message for the
model, counted, never an exception out of the run.

The parsers share :func:`json_call` (one call as a JSON object) here, so
each parser plugin holds only what its family writes around the JSON.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import attrs

from molting.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from molting.components import ToolParser


@attrs.frozen
class ToolCall:
    """One call a model wrote: the tool's ``name`` and its ``arguments`` (a JSON object)."""

    name: str
    arguments: Mapping[str, Any] = attrs.field(factory=dict)
    id: str | None = None

    def message(self) -> dict[str, Any]:
        """The call as an assistant message's ``tool_calls`` entry (the form chat templates read)."""
        call: dict[str, Any] = {"type": "function", "function": {"name": self.name, "arguments": dict(self.arguments)}}
        return {**call, "id": self.id} if self.id is not None else call


@attrs.frozen
class ParsedTurn:
    """What a :class:`molting.ToolParser` found in a model's turn: its text without the calls, the calls, and a
    reason for each call that did not parse (a call the model meant to make, written wrongly)."""

    content: str
    calls: tuple[ToolCall, ...] = ()
    malformed: tuple[str, ...] = ()


@attrs.frozen
class ToolResult:
    """What running one call gave: the text the model reads next, and whether it is an error."""

    name: str
    content: str
    error: bool = False
    call_id: str | None = None

    def message(self) -> dict[str, Any]:
        """The result as a ``tool`` message (the form chat templates read)."""
        message = {"role": "tool", "name": self.name, "content": self.content}
        return {**message, "tool_call_id": self.call_id} if self.call_id is not None else message


def tool_schemas(tools: Sequence[Callable[..., Any]], owner: str) -> list[dict[str, Any]]:
    """The JSON schema of each tool (transformers' ``get_json_schema``); a :class:`ConfigError` naming ``owner``
    and the tool when a function lacks the type hints or docstring a schema is made from."""
    from transformers.utils import get_json_schema

    schemas = []
    for tool in tools:
        try:
            schemas.append(get_json_schema(tool))
        except Exception as exc:  # transformers' DocstringParsingException, TypeHintParsingException
            name = getattr(tool, "__name__", repr(tool))
            raise ConfigError(
                f"{owner}: tool {name!r} cannot be described to the model: {exc}. A tool needs a type hint on every "
                "argument and a Google-style docstring with an Args: line for each") from exc
    names = [schema["function"]["name"] for schema in schemas]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"{owner}: two tools are named {', '.join(repeated)}; each tool needs a name of its own")
    return schemas


def json_call(text: str, arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | str:
    """One call written as a JSON object ``{"name": ..., "arguments": {...}}`` (the arguments may be a JSON string,
    as OpenAI writes them): the :class:`ToolCall`, or why it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at character {exc.pos}): {_short(text)}"
    if not isinstance(value, dict):
        return f"expected a JSON object with a name and arguments, got {_short(text)}"
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return f"the call has no \"name\" string: {_short(text)}"
    key = next((k for k in arguments_keys if k in value), None)
    arguments = {} if key is None else value[key]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return f"the arguments of {name!r} are a string that is not JSON: {_short(arguments)}"
    if not isinstance(arguments, dict):
        return f"the arguments of {name!r} must be a JSON object, got {_short(json.dumps(arguments))}"
    call_id = value.get("id")
    return ToolCall(name, arguments, call_id if isinstance(call_id, str) else None)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- running calls


@attrs.frozen
class CallCounts:
    """What a turn's calls came to: calls attempted (malformed ones included) and those that ended in an error."""

    calls: int = 0
    errors: int = 0
    malformed: int = 0


async def run_calls(parsed: ParsedTurn, tools: Sequence[Callable[..., Any]],
                    timeout: float) -> tuple[list[ToolResult], CallCounts]:
    """Run each call of ``parsed`` (concurrently, each under ``timeout`` seconds) and report each malformed one.

    Every outcome is a :class:`ToolResult` the model reads in its next turn:
    a malformed call, an unknown tool, arguments the function does not take,
    a tool that raises or runs past the timeout all give an ``Error: ...``
    result (counted in :class:`CallCounts`), never an exception.
    """
    table = {getattr(tool, "__name__", ""): tool for tool in tools}
    malformed = [ToolResult("", f"Error: the tool call could not be read: {reason}", error=True)
                 for reason in parsed.malformed]
    results = await asyncio.gather(*(_run_one(call, table, timeout) for call in parsed.calls))
    every = malformed + list(results)
    counts = CallCounts(calls=len(every), errors=sum(r.error for r in every), malformed=len(malformed))
    return every, counts


async def _run_one(call: ToolCall, table: Mapping[str, Callable[..., Any]], timeout: float) -> ToolResult:
    def error(text: str) -> ToolResult:
        return ToolResult(call.name, f"Error: {text}", error=True, call_id=call.id)

    function = table.get(call.name)
    if function is None:
        return error(f"unknown tool {call.name!r}; the tools are {', '.join(sorted(table)) or 'none'}")
    try:
        inspect.signature(function).bind(**call.arguments)
    except TypeError as exc:
        return error(f"bad arguments for {call.name!r}: {exc}")
    try:
        if inspect.iscoroutinefunction(function):
            value = await asyncio.wait_for(function(**call.arguments), timeout)
        else:
            value = await asyncio.wait_for(_in_thread(function, call.arguments), timeout)
    except asyncio.TimeoutError:
        return error(f"{call.name!r} did not answer within {timeout:g} s")
    except Exception as exc:  # the tool's own failure is the model's to read, not the run's to die of
        return error(f"{call.name!r} raised {type(exc).__name__}: {exc}")
    return ToolResult(call.name, _as_text(value), call_id=call.id)


def _in_thread(function: Callable[..., Any], arguments: Mapping[str, Any]) -> asyncio.Future:
    """``function(**arguments)`` on a daemon thread of its own, as a future of this loop: a tool that never returns
    is abandoned at its timeout and cannot keep the process from exiting (a thread pool's workers would)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def deliver(outcome: Callable[[], None]) -> None:
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:  # the loop closed after the timeout gave up on this call: nobody is waiting
            pass

    def work() -> None:
        try:
            value = function(**arguments)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            deliver(functools.partial(future.set_exception, exc))
        else:
            deliver(functools.partial(future.set_result, value))

    threading.Thread(target=work, name=f"molting-tool-{getattr(function, '__name__', 'call')}", daemon=True).start()
    return future


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


# --------------------------------------------------------------------------- choosing a parser


def parser_for(host: Any, name: str, tokenizer: Any, model: str = "the model",
               required: bool = True) -> ToolParser | None:
    """The registered tool parser ``name``, or with ``auto`` the one that recognises ``tokenizer``'s chat template;
    a :class:`ConfigError` when several do, and when none does unless not ``required`` (then ``None``: an
    environment without tools needs none)."""
    if name != "auto":
        return host.get("tool_parser", name)
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = "\n".join(template.values())
    found = [host.get("tool_parser", n) for n in host.names("tool_parser")
             if host.get("tool_parser", n).recognises(template)]
    if len(found) == 1:
        return found[0]
    every = ", ".join(host.names("tool_parser")) or "none installed"
    if not found and not required:
        return None
    if not found:
        raise ConfigError(f"no tool parser recognises the chat template of {model}, so the tool calls it writes "
                          f"cannot be read; name the format with --tool-parser NAME (installed: {every})")
    raise ConfigError(f"the chat template of {model} looks like several tool-call formats "
                      f"({', '.join(p.name for p in found)}); name one with --tool-parser NAME")
