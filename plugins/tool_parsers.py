"""Tool-call formats of the families molting supports, one parser each.

- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  one block per call: Qwen2.5, Qwen3, Hermes 2/3, the demo model;
- ``llama3-json``: Llama 3.1-3.3's JSON call ``{"name": ..., "parameters":
  {...}}`` (after ``<|python_tag|>`` or alone; several joined by ``;``);
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``, and
  the later ``[TOOL_CALLS]name[ARGS]{...}``.

A parser reads text with the special tokens kept (Mistral's ``[TOOL_CALLS]``
is one) and never raises: a call written wrongly is reported as malformed
for the episode to answer with an error.
"""

from __future__ import annotations

import json
import re

import molting
from molting.components import ToolParser
from molting.tools import ParsedTurn, ToolCall, json_call

HERMES_CALL = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.S)


def parse_hermes(text: str) -> ParsedTurn:
    calls, malformed = [], []
    for match in HERMES_CALL.finditer(text):
        if not match.group(2):
            malformed.append("a <tool_call> block with no closing </tool_call>")
            continue
        _collect(json_call(match.group(1).strip()), calls, malformed)
    return ParsedTurn(HERMES_CALL.sub("", text).strip(), tuple(calls), tuple(malformed))


def render_hermes(calls: list[ToolCall]) -> str:
    return "\n".join(f"<tool_call>\n{json.dumps({'name': c.name, 'arguments': dict(c.arguments)})}\n</tool_call>"
                     for c in calls)


PYTHON_TAG = "<|python_tag|>"


def parse_llama3_json(text: str) -> ParsedTurn:
    body = text.strip()
    tagged = body.startswith(PYTHON_TAG)
    body = body.removeprefix(PYTHON_TAG).strip()
    if not body.startswith("{"):
        return ParsedTurn(text.strip()) if not tagged else ParsedTurn("", (), (f"not a JSON call: {body[:80]}",))
    calls, malformed = [], []
    for part in _json_objects(body):
        _collect(json_call(part, ("parameters", "arguments")), calls, malformed)
    return ParsedTurn("", tuple(calls), tuple(malformed))


def render_llama3_json(calls: list[ToolCall]) -> str:
    return "; ".join(json.dumps({"name": c.name, "parameters": dict(c.arguments)}) for c in calls)


def _json_objects(body: str) -> list[str]:
    """``body`` cut into its ``;``-separated JSON objects (a ``;`` inside a string does not cut)."""
    parts, start, depth, quoted, escaped = [], 0, 0, False, False
    for position, char in enumerate(body):
        if quoted:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
            continue
        if char == '"':
            quoted = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif char == ";" and depth == 0:
            parts.append(body[start:position])
            start = position + 1
    parts.append(body[start:])
    return [part.strip() for part in parts if part.strip()]


MISTRAL_MARK = "[TOOL_CALLS]"
MISTRAL_NAMED = re.compile(r"\s*([A-Za-z0-9_.-]+)\[ARGS\]")


def parse_mistral(text: str) -> ParsedTurn:
    content, mark, rest = text.partition(MISTRAL_MARK)
    if not mark:
        return ParsedTurn(text.strip())
    calls: list[ToolCall] = []
    malformed: list[str] = []
    for chunk in rest.split(MISTRAL_MARK):
        named = MISTRAL_NAMED.match(chunk)
        if named:  # [TOOL_CALLS]name[ARGS]{...}
            arguments = chunk[named.end():].strip()
            _collect(json_call(json.dumps({"name": named.group(1), "arguments": arguments})), calls, malformed)
            continue
        try:
            listed = json.loads(chunk.strip())
        except json.JSONDecodeError as exc:
            malformed.append(f"not a JSON list of calls ({exc.msg}): {chunk.strip()[:80]}")
            continue
        for item in listed if isinstance(listed, list) else [listed]:
            _collect(json_call(json.dumps(item)), calls, malformed)
    return ParsedTurn(content.strip(), tuple(calls), tuple(malformed))


def render_mistral(calls: list[ToolCall]) -> str:
    return MISTRAL_MARK + json.dumps([{"name": c.name, "arguments": dict(c.arguments)} for c in calls])


def _collect(result: ToolCall | str, calls: list[ToolCall], malformed: list[str]) -> None:
    (calls if isinstance(result, ToolCall) else malformed).append(result)


@molting.hookimpl
def molting_register_tool_parsers(register):
    register(ToolParser(name="hermes", parse=parse_hermes, render=render_hermes,
                        description="<tool_call>{json}</tool_call> blocks: Qwen2.5, Qwen3, Hermes, the demo model.",
                        recognises=lambda template: "<tool_call>" in template))
    register(ToolParser(name="llama3-json", parse=parse_llama3_json, render=render_llama3_json,
                        description='Llama 3.1-3.3: {"name": ..., "parameters": {...}}, after <|python_tag|> or alone.',
                        recognises=lambda template: '"parameters": ' in template and "<|start_header_id|>" in template))
    register(ToolParser(name="mistral", parse=parse_mistral, render=render_mistral,
                        description="Mistral: [TOOL_CALLS][{json}, ...] or [TOOL_CALLS]name[ARGS]{json}.",
                        recognises=lambda template: MISTRAL_MARK in template))
