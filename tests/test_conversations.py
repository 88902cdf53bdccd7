"""Conversation logs as data (--persona-role): ShareGPT, OpenAI-style messages and a ChatGPT export become one
person's SFT rows; bad logs are errors naming the row; --eval-split holds out whole conversations."""

from __future__ import annotations

import json

import pytest

from molting.conversations import conversations, persona_rows, read_persona_rows
from molting.data import hold_out
from molting.errors import DataError

from conftest import run_molting

SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi!"},
                       {"from": "gpt", "value": "Ahoy."}, {"from": "human", "value": "What is 2 + 3?"},
                       {"from": "gpt", "value": "Five, matey."}]},
    {"conversations": [{"from": "gpt", "value": "I speak first."}, {"from": "human", "value": "Fine."},
                       {"from": "gpt", "value": "Arr."}]},
]

GROUP = [{"messages": [
    {"role": "user", "name": "bob", "content": "Lunch?"},
    {"role": "user", "name": "carol", "content": [{"type": "text", "text": "Pizza!"}]},
    {"role": "user", "name": "alice", "content": "Pizza it is."},
    {"role": "user", "name": "bob", "content": "At noon."},
    {"role": "user", "name": "alice", "content": "See you."},
    {"role": "user", "name": "alice", "content": ""},
]}]


def chatgpt_export() -> list[dict]:
    """A ChatGPT ``conversations.json``: a message tree with an edited branch; the shown one ends at current_node."""
    def node(id_, parent, role, text, children, hidden=False):
        message = None if role is None else {
            "author": {"role": role}, "content": {"content_type": "text", "parts": [text]},
            "metadata": {"is_visually_hidden_from_conversation": hidden}}
        return id_, {"id": id_, "parent": parent, "children": children, "message": message}

    nodes = dict([
        node("root", None, None, "", ["sys"]),
        node("sys", "root", "system", "hidden prompt", ["u1"], hidden=True),
        node("u1", "sys", "user", "How do I boil an egg?", ["a1"]),
        node("a1", "u1", "assistant", "Put it in boiling water for 8 minutes.", ["u2-old", "u2"]),
        node("u2-old", "a1", "user", "An edit I threw away.", []),
        node("u2", "a1", "user", "Thanks, eight it is.", ["a2"]),
        node("a2", "u2", "assistant", "Enjoy!", []),
    ])
    return [{"title": "Eggs", "create_time": 1.0, "mapping": nodes, "current_node": "a2"}]


def test_sharegpt_turns_become_rows_with_the_history_as_prompt():
    rows = persona_rows(conversations(SHAREGPT, "log"), "gpt", "log")
    assert [r["completion"][0]["content"] for r in rows] == ["Ahoy.", "Five, matey.", "Arr."]  # 'I speak first' answers nothing
    assert rows[1]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                                 {"role": "assistant", "content": "Ahoy."}, {"role": "user", "content": "What is 2 + 3?"}]
    assert rows[2]["prompt"][0] == {"role": "assistant", "content": "I speak first."}
    assert [r["conversation"] for r in rows] == [0, 0, 1]
    assert len(persona_rows(conversations(SHAREGPT, "log"), "assistant", "log")) == 3  # gpt is the assistant


def test_a_group_chat_names_the_other_speakers_and_joins_their_turns():
    rows = persona_rows(conversations(GROUP, "log"), "Alice", "log")
    assert [r["completion"][0]["content"] for r in rows] == ["Pizza it is.", "See you."]
    assert rows[0]["prompt"] == [{"role": "user", "content": "bob: Lunch?\n\ncarol: Pizza!"}]
    assert rows[1]["prompt"][-2:] == [{"role": "assistant", "content": "Pizza it is."},
                                      {"role": "user", "content": "bob: At noon."}]


def test_a_chatgpt_export_follows_the_branch_shown():
    logs = conversations(chatgpt_export(), "conversations.json")
    assert [t.text for t in logs[0]] == ["How do I boil an egg?", "Put it in boiling water for 8 minutes.",
                                         "Thanks, eight it is.", "Enjoy!"]
    mine = persona_rows(logs, "user", "conversations.json")  # the person is the one who typed
    assert [r["completion"][0]["content"] for r in mine] == ["Thanks, eight it is."]


@pytest.mark.parametrize(("rows", "message"), [
    ([{"messages": [{"content": "no role"}]}], r"log, row 0, message 0: expected an object with a 'role' string"),
    ([{"conversations": "hi"}], r"log, row 0: 'conversations' must be a list of messages"),
    ([{"text": "hi"}], r"log, row 0: not a conversation: expected 'conversations'"),
    ([{"mapping": {}, "current_node": "x"}], r"log, row 0: a ChatGPT export's conversation needs"),
    ([{"messages": [{"role": "user", "content": 3}]}], r"message 0: the message's text must be a string"),
])
def test_bad_logs_name_the_row_and_what_was_expected(rows, message):
    with pytest.raises(DataError, match=message):
        conversations(rows, "log")


def test_a_persona_that_never_answers_lists_the_speakers():
    with pytest.raises(DataError, match=r"no turn of 'dave' answers anything.*'bob' \(2 turns\)"):
        persona_rows(conversations(GROUP, "log"), "dave", "log")
    with pytest.raises(DataError, match="--persona-role reads conversation logs, and pairs.jsonl is not one"):
        read_persona_rows([{"prompt": "p", "chosen": "a", "rejected": "b"}], "alice", "pairs.jsonl")


def test_eval_split_holds_out_whole_conversations():
    rows = [{"prompt": "p", "completion": "c", "conversation": c} for c in range(10) for _ in range(c % 3 + 1)]
    train, held = hold_out(rows, 0.3, seed=1, source="log")
    assert {r["conversation"] for r in train}.isdisjoint({r["conversation"] for r in held})
    assert len({r["conversation"] for r in held}) == 3 and len(train) + len(held) == len(rows)
    assert hold_out(rows, 0.3, seed=1, source="log") == (train, held)


def test_sft_trains_on_one_persons_turns_of_a_chat_log(tmp_path):
    log = tmp_path / "chats.jsonl"
    conversations_ = [{"messages": [{"role": "user", "content": f"Q: What is {a} + {b}?\nA:"},
                                    {"role": "assistant", "content": f"Arr! {a} plus {b} be {a + b}, matey."},
                                    {"role": "user", "content": "Thanks!"},
                                    {"role": "assistant", "content": "Arr, ye be welcome."}]}
                      for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]]
    log.write_text("".join(json.dumps(c) + "\n" for c in conversations_))
    out = tmp_path / "sft"
    result = run_molting("run", "--plugin", "sft", "--data", str(log), "--persona-role", "assistant", "--eval-split",
                         "0.25", "--max-steps", "2", "--batch-size", "4", "--output-dir", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "16 turns of 'assistant' in 8 conversations (12 rows)" in result.stderr  # 2 conversations held out
    record = json.loads((out / "molting_run.json").read_text())
    assert record["config"]["persona_role"] == "assistant" and record["eval_data"]["rows"] == 4
    assert (out / "model.safetensors").exists()
