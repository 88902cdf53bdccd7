"""Tools: schemas from Python functions, the families' call formats parsed, calls run under a timeout."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from molting.discovery import load_plugins
from molting.errors import ConfigError
from molting.tools import ParsedTurn, ToolCall, json_call, parser_for, run_calls, tool_schemas

import families


@pytest.fixture(scope="module")
def host():
    return load_plugins()


def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def explode(text: str) -> str:
    """Always fails.

    Args:
        text: Anything.
    """
    raise ValueError(f"cannot handle {text!r}")


def sleepy(seconds: float) -> str:
    """Sleeps.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "awake"


async def lookup(key: str) -> dict:
    """Looks a key up.

    Args:
        key: The key.
    """
    await asyncio.sleep(0)
    return {"key": key, "value": len(key)}


def test_tool_schemas_come_from_type_hints_and_docstrings():
    (schema,) = tool_schemas([add], "environment 'x'")
    assert schema["function"]["name"] == "add"
    assert schema["function"]["parameters"]["properties"]["a"] == {"type": "integer", "description": "The first number."}


def test_a_tool_without_a_docstring_is_a_config_error_naming_it():
    def bare(x: int) -> int:
        return x

    with pytest.raises(ConfigError, match=r"environment 'calc': tool 'bare' cannot be described"):
        tool_schemas([bare], "environment 'calc'")


def test_two_tools_of_one_name_are_refused():
    with pytest.raises(ConfigError, match="two tools are named add"):
        tool_schemas([add, add], "environment 'x'")


@pytest.mark.parametrize("text, expected", [
    ('{"name": "add", "arguments": {"a": 1, "b": 2}}', ToolCall("add", {"a": 1, "b": 2})),
    ('{"name": "add", "parameters": {"a": 1}}', ToolCall("add", {"a": 1})),
    ('{"name": "add", "arguments": "{\\"a\\": 3}"}', ToolCall("add", {"a": 3})),  # OpenAI writes a JSON string
    ('{"name": "now"}', ToolCall("now", {})),
    ('{"name": "add", "arguments": {}, "id": "call_1"}', ToolCall("add", {}, "call_1")),
])
def test_json_call_reads_a_call(text, expected):
    assert json_call(text) == expected


@pytest.mark.parametrize("text, reason", [
    ('{"name": "add", "arguments": {"a": 1', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"arguments": {}}', 'no "name" string'),
    ('{"name": "add", "arguments": [1]}', "must be a JSON object"),
    ('{"name": "add", "arguments": "a=1"}', "a string that is not JSON"),
])
def test_json_call_says_why_a_call_is_malformed(text, reason):
    result = json_call(text)
    assert isinstance(result, str) and reason in result


# --------------------------------------------------------------------------- the families' formats


HERMES_CASES = [
    ("The answer is 3.", ParsedTurn("The answer is 3.")),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
     ParsedTurn("", (ToolCall("add", {"a": 1, "b": 2}),))),
    ('Let me add. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
     '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>',
     ParsedTurn("Let me add.", (ToolCall("add", {"a": 1, "b": 2}), ToolCall("add", {"a": 3, "b": 4})))),
]


@pytest.mark.parametrize("text, expected", HERMES_CASES)
def test_hermes_reads_tool_call_blocks(host, text, expected):
    assert host.get("tool_parser", "hermes").parse(text) == expected


@pytest.mark.parametrize("parser, text, reason", [
    ("hermes", '<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>', "not valid JSON"),
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1', "no closing </tool_call>"),
    ("llama3-json", '{"name": "add", "parameters": {"a": }}', "not valid JSON"),
    ("llama3-json", "<|python_tag|>add(1, 2)", "not a JSON call"),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}', "not a JSON list"),
    ("mistral", '[TOOL_CALLS][{"arguments": {}}]', 'no "name"'),
])
def test_a_call_written_wrongly_is_malformed_not_an_exception(host, parser, text, reason):
    parsed = host.get("tool_parser", parser).parse(text)
    assert not parsed.calls and len(parsed.malformed) == 1 and reason in parsed.malformed[0]


@pytest.mark.parametrize("text, expected", [
    ("Paris is the capital.", ParsedTurn("Paris is the capital.")),
    ('{"name": "add", "parameters": {"a": 1, "b": 2}}', ParsedTurn("", (ToolCall("add", {"a": 1, "b": 2}),))),
    ('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', ParsedTurn("", (ToolCall("add", {"a": 1, "b": 2}),))),
    ('{"name": "a", "parameters": {"s": "x;y"}}; {"name": "b", "parameters": {}}',
     ParsedTurn("", (ToolCall("a", {"s": "x;y"}), ToolCall("b", {})))),
])
def test_llama3_json_reads_json_calls(host, text, expected):
    assert host.get("tool_parser", "llama3-json").parse(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("No tools needed.", ParsedTurn("No tools needed.")),
    ('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "now", "arguments": {}}]',
     ParsedTurn("", (ToolCall("add", {"a": 1, "b": 2}), ToolCall("now", {})))),
    ('[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}', ParsedTurn("", (ToolCall("add", {"a": 1, "b": 2}),))),
])
def test_mistral_reads_both_of_its_formats(host, text, expected):
    assert host.get("tool_parser", "mistral").parse(text) == expected


CALLS = [ToolCall("add", {"a": 12, "b": 30}), ToolCall("lookup", {"key": "a \"quoted\"; value"})]


@pytest.mark.parametrize("name", ["hermes", "llama3-json", "mistral"])
def test_each_parser_reads_what_it_renders(host, name):
    parser = host.get("tool_parser", name)
    assert parser.parse(parser.render(CALLS)).calls == tuple(CALLS)


def _assistant_text(tokenizer, calls):
    """What a family's chat template writes for an assistant turn making ``calls``, without its end of turn."""
    messages = [{"role": "user", "content": "add them"}]
    turn = {"role": "assistant", "content": "", "tool_calls": [c.message() for c in calls]}
    tools = tool_schemas([add], "test")
    before = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    after = tokenizer.apply_chat_template(messages + [turn], tools=tools, tokenize=False)
    assert after.startswith(before)
    return after[len(before):].strip().removesuffix(tokenizer.eos_token).removesuffix("<|eot_id|>")


@pytest.mark.parametrize("family, template, parser", [
    ("qwen2.5", None, "hermes"), ("qwen3", None, "hermes"), ("llama3", "llama3_1", "llama3-json"),
])
def test_the_parser_reads_the_calls_a_family_template_writes(host, family, template, parser):
    tokenizer = families.build_tokenizer(families.FAMILIES[family])
    if template:
        tokenizer.chat_template = families.template_text(families.Family(template, "", "", template=f"trl:{template}"))
    calls = [ToolCall("add", {"a": 12, "b": 30})]
    assert parser_for(host, "auto", tokenizer).name == parser
    assert host.get("tool_parser", parser).parse(_assistant_text(tokenizer, calls)).calls == tuple(calls)


def test_auto_picks_hermes_for_the_demo_model_and_none_for_a_template_without_tools(host):
    from molting.models import load_tokenizer
    from molting.demo import demo_model_dir

    assert parser_for(host, "auto", load_tokenizer(demo_model_dir())).name == "hermes"
    gemma = families.build_tokenizer(families.FAMILIES["gemma2"])
    assert parser_for(host, "auto", gemma, required=False) is None
    with pytest.raises(ConfigError, match="no tool parser recognises the chat template of gemma, so the tool calls it writes cannot be read; name the format"):
        parser_for(host, "auto", gemma, "gemma")
    assert parser_for(host, "mistral", gemma).name == "mistral"  # named: whatever the template


# --------------------------------------------------------------------------- running calls


def _run(parsed, tools, timeout=2.0):
    return asyncio.run(run_calls(parsed, tools, timeout))


def test_calls_run_and_their_results_are_tool_messages():
    results, counts = _run(ParsedTurn("", (ToolCall("add", {"a": 2, "b": 3}, "c1"), ToolCall("lookup", {"key": "ab"}))),
                           [add, lookup])
    assert [r.message() for r in results] == [
        {"role": "tool", "name": "add", "content": "5", "tool_call_id": "c1"},
        {"role": "tool", "name": "lookup", "content": json.dumps({"key": "ab", "value": 2})}]
    assert (counts.calls, counts.errors, counts.malformed) == (2, 0, 0)


@pytest.mark.parametrize("call, message", [
    (ToolCall("divide", {"a": 1}), "Error: unknown tool 'divide'; the tools are add, explode, sleepy"),
    (ToolCall("add", {"a": 1}), "Error: bad arguments for 'add': missing a required argument: 'b'"),
    (ToolCall("add", {"a": 1, "b": 2, "c": 3}), "Error: bad arguments for 'add': got an unexpected keyword argument 'c'"),
    (ToolCall("explode", {"text": "x"}), "Error: 'explode' raised ValueError: cannot handle 'x'"),
    (ToolCall("sleepy", {"seconds": 5}), "Error: 'sleepy' did not answer within 0.2 s"),
])
def test_every_failure_of_a_call_is_an_error_the_model_reads(call, message):
    started = time.perf_counter()
    (result,), counts = _run(ParsedTurn("", (call,)), [add, explode, sleepy], timeout=0.2)
    assert result.error and result.content == message
    assert (counts.calls, counts.errors) == (1, 1)
    assert time.perf_counter() - started < 2  # a hung tool is abandoned at its timeout


def test_a_tool_that_outlives_its_timeout_finishes_quietly_after_the_loop_closed(monkeypatch):
    raised = []
    monkeypatch.setattr("threading.excepthook", raised.append)
    (result,), _ = _run(ParsedTurn("", (ToolCall("sleepy", {"seconds": 0.3}),)), [sleepy], timeout=0.05)
    assert result.error
    time.sleep(0.6)  # the abandoned thread wakes up and finds its loop gone
    assert raised == []


def test_a_malformed_call_is_reported_and_counted():
    results, counts = _run(ParsedTurn("", (ToolCall("add", {"a": 1, "b": 1}),), ("not valid JSON: {",)), [add])
    assert results[0].content == "Error: the tool call could not be read: not valid JSON: {"
    assert results[1].content == "2"
    assert (counts.calls, counts.errors, counts.malformed) == (2, 1, 1)
