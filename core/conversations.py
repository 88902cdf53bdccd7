"""Conversation logs as training data: chat exports read, one person's turns made the targets.

``--data chats.jsonl --persona-role NAME`` turns a log of conversations into
rows that teach a model to answer as NAME does. Each of NAME's turns becomes
one row: the conversation before it is the ``prompt`` (a message list: NAME's
earlier turns as ``assistant``, everyone else's as ``user``, a system message
kept), and the turn is the ``completion``. Consecutive messages of one side
are joined, since chat templates want the roles to alternate. With more than
one other speaker, each of their messages starts with the speaker's name. A
turn of NAME's that opens a conversation has nothing to answer and is left
out. Each row carries its ``conversation`` (the log's index), so
``--eval-split`` holds out whole conversations (:func:`molting.data.hold_out`).

The formats, told apart row by row:

* ShareGPT: ``{"conversations": [{"from": "human" | "gpt" | "system" | NAME, "value": ...}]}``;
* OpenAI-style messages: ``{"messages": [{"role": ..., "content": ..., "name": ...}]}``
  (``content`` a string or a list of text parts);
* a ChatGPT export's ``conversations.json``: a list of ``{"title", "mapping", "current_node"}``,
  read along the branch that ends at ``current_node`` (the one shown).

NAME matches a turn's role or its speaker's name, case-insensitively; ShareGPT's
``human`` and ``gpt`` are also ``user`` and ``assistant``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Sequence

import attrs

from molting.errors import DataError

ALIASES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "bot": "assistant", "model": "assistant"}


@attrs.frozen
class Turn:
    """One message of a conversation: who wrote it (a role, and a name when the log gives one) and its text."""

    role: str
    text: str
    name: str | None = None

    def by(self, persona: str) -> bool:
        wanted = persona.casefold()
        return wanted in {self.role.casefold(), ALIASES.get(self.role.casefold(), ""), (self.name or "").casefold()}

    @property
    def speaker(self) -> str:
        return self.name or self.role


def is_chat_log(row: Any) -> bool:
    """Whether a row is a conversation in one of the formats above (not already prompt/completion rows)."""
    return isinstance(row, dict) and "prompt" not in row and any(k in row for k in ("conversations", "mapping",
                                                                                      "messages"))


def conversations(rows: Iterable[dict[str, Any]], source: str) -> list[list[Turn]]:
    """Each row's conversation as turns, whatever its format; an error names the row and what was expected."""
    return [_turns(row, index, source) for index, row in enumerate(rows)]


def _turns(row: dict[str, Any], index: int, source: str) -> list[Turn]:
    where = f"{source}, row {index}"
    if "mapping" in row:
        return _chatgpt_turns(row, where)
    if "conversations" in row:
        return [_turn(m, where, i, role="from", text="value") for i, m in enumerate(_list(row, "conversations", where))]
    if "messages" in row:
        return [_turn(m, where, i) for i, m in enumerate(_list(row, "messages", where))]
    raise DataError(f"{where}: not a conversation: expected 'conversations' (ShareGPT), 'messages' (OpenAI-style) or "
                    f"'mapping' (a ChatGPT export), got the fields {sorted(row)}")


def _list(row: dict[str, Any], key: str, where: str) -> list[Any]:
    value = row[key]
    if not isinstance(value, list):
        raise DataError(f"{where}: {key!r} must be a list of messages, got {type(value).__name__}")
    return value


def _turn(message: Any, where: str, position: int, role: str = "role", text: str = "content") -> Turn:
    if not isinstance(message, dict) or not isinstance(message.get(role), str):
        raise DataError(f"{where}, message {position}: expected an object with a {role!r} string and {text!r}, "
                        f"got {message!r:.80}")
    name = message.get("name") if isinstance(message.get("name"), str) else None
    return Turn(message[role], _text(message.get(text), f"{where}, message {position}"), name)


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI's list of parts, a ChatGPT export's parts
        return "".join(p if isinstance(p, str) else p.get("text", "") if isinstance(p, dict) else "" for p in content)
    raise DataError(f"{where}: the message's text must be a string or a list of text parts, got "
                    f"{type(content).__name__}")


def _chatgpt_turns(row: dict[str, Any], where: str) -> list[Turn]:
    """The branch of a ChatGPT export's message tree that ends at ``current_node``, root first; tool calls,
    hidden system messages and empty nodes left out."""
    mapping, node = row.get("mapping"), row.get("current_node")
    if not isinstance(mapping, dict) or node not in mapping:
        raise DataError(f"{where}: a ChatGPT export's conversation needs 'mapping' and a 'current_node' in it")
    branch = []
    while node is not None:
        if node not in mapping or len(branch) > len(mapping):
            raise DataError(f"{where}: the message tree is broken at node {node!r}")
        branch.append(mapping[node])
        node = mapping[node].get("parent")
    turns = []
    for entry in reversed(branch):
        message = entry.get("message") or {}
        role = (message.get("author") or {}).get("role")
        content = message.get("content") or {}
        hidden = (message.get("metadata") or {}).get("is_visually_hidden_from_conversation")
        if role in ("user", "assistant", "system") and not hidden and content.get("content_type", "text") == "text":
            text = _text(content.get("parts"), where)
            if text.strip():
                turns.append(Turn(role, text))
    return turns


def persona_rows(logs: Sequence[list[Turn]], persona: str, source: str) -> list[dict[str, Any]]:
    """One SFT row per turn of ``persona`` that answers something (see the module's doc)."""
    rows = []
    for number, turns in enumerate(logs):
        others = {t.speaker for t in turns if not t.by(persona) and t.role != "system"}
        for position, turn in enumerate(turns):
            if turn.by(persona) and turn.text.strip():
                prompt = _history(turns[:position], persona, named=len(others) > 1)
                if any(m["role"] == "user" for m in prompt):
                    rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": turn.text.strip()}],
                                 "conversation": number})
    if not rows:
        raise DataError(f"{source}: no turn of {persona!r} answers anything (--persona-role); the speakers there are "
                        f"{_speakers(logs)}")
    return rows


def _history(turns: Sequence[Turn], persona: str, named: bool) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    for turn in turns:
        role = "system" if turn.role == "system" else "assistant" if turn.by(persona) else "user"
        text = f"{turn.speaker}: {turn.text.strip()}" if named and role == "user" else turn.text.strip()
        if not text:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


def _speakers(logs: Sequence[list[Turn]]) -> str:
    counts = Counter(t.speaker for turns in logs for t in turns)
    return ", ".join(f"{speaker!r} ({n} turns)" for speaker, n in counts.most_common(10)) or "none"


def read_persona_rows(rows: Any, persona: str, source: str) -> list[dict[str, Any]]:
    """The persona's SFT rows from a log's rows (a list, or a ``datasets.Dataset`` of them; a ChatGPT export
    is one JSON list of conversations, so its rows are the conversations)."""
    from molting.data import iter_rows

    listed = list(iter_rows(rows))
    if not listed or not is_chat_log(listed[0]):
        fields = sorted(listed[0]) if listed else []
        raise DataError(f"--persona-role reads conversation logs, and {source} is not one (its first row has the "
                        f"fields {fields}); expected 'conversations' (ShareGPT), 'messages' or a ChatGPT export")
    return persona_rows(conversations(listed, source), persona, source)
