"""Data by Hugging Face hub id, and the formats people publish, offline from a cache laid out as huggingface_hub's.

A hub dataset is its files (a card whose metadata declares subsets and
splits, and data files); the tests lay them out in a hub cache and read
them back with ``HF_HUB_OFFLINE=1``, as a run does after one online fetch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hubcache import add_to_cache
from molting.config import RunConfig
from molting.data import check_columns, read_hub_dataset, rename_columns
from molting.errors import DataError
from molting.pairs import SCHEMAS, format_pairs, split_prompt

CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train.jsonl
  - split: test
    path: data/test.jsonl
- config_name: helpful
  data_files:
  - split: train
    path: helpful/train.jsonl
---
# Pairs
"""

HH_CHOSEN = "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: And 3+3?\n\nAssistant: It is 6."
HH_REJECTED = "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: And 3+3?\n\nAssistant: It is 7, I think."


def pairs(count: int, tag: str) -> list[dict[str, str]]:
    return [{"prompt": f"Q{tag}{i}?", "response_a": f" yes {i}", "response_b": f" no {i}"} for i in range(count)]


@pytest.fixture
def hub_data(tmp_path, monkeypatch):
    """An offline hub cache holding ``acme/pairs`` (subsets default and helpful; default has train and test)."""
    from huggingface_hub import constants

    source = tmp_path / "source"
    (source / "data").mkdir(parents=True)
    (source / "helpful").mkdir()
    (source / "README.md").write_text(CARD)
    for path, rows in (("data/train.jsonl", pairs(12, "t")), ("data/test.jsonl", pairs(4, "e"))):
        (source / path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (source / "helpful" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs(3, "h")))
    cache = tmp_path / "hub"
    commit = add_to_cache(cache, "acme/pairs", source, repo_type="dataset")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    return {"cache": cache, "commit": commit}


def test_a_hub_dataset_reads_offline_by_subset_and_split(hub_data):
    rows, directory = read_hub_dataset("acme/pairs")
    assert [r["prompt"] for r in rows] == [f"Qt{i}?" for i in range(12)]
    assert directory.name == hub_data["commit"] and directory.parent.name == "snapshots"
    assert [r["prompt"] for r in read_hub_dataset("acme/pairs", split="test")[0]] == [f"Qe{i}?" for i in range(4)]
    assert [r["prompt"] for r in read_hub_dataset("acme/pairs", "helpful")[0]] == ["Qh0?", "Qh1?", "Qh2?"]
    assert len(read_hub_dataset(f"acme/pairs@{hub_data['commit']}")[0]) == 12


@pytest.mark.parametrize("args, message", [
    (("acme/pairs", "harmless"), "has no subset 'harmless'; its subsets: default, helpful (--data-subset)"),
    (("acme/pairs", None, "validation"), "has the splits train, test, not 'validation': choose one with --data-split"),
    (("acme/other",), "dataset 'acme/other' is not in the Hugging Face cache"),
])
def test_a_missing_subset_split_or_dataset_names_what_there_is(hub_data, args, message):
    with pytest.raises(DataError) as caught:
        read_hub_dataset(*args)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_run_on_a_hub_dataset_offline_records_its_id_commit_and_split(hub_data, tmp_path):
    """The CLI end to end in a fresh process: --data ORG/NAME, --data-split, --columns; the record names them."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_data["cache"]),
           "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}
    done = subprocess.run([sys.executable, "-m", "molting", "run", "--plugin", "dpo", "--data", "acme/pairs",
                           "--data-split", "test", "--columns", "chosen=response_a,rejected=response_b",
                           "--max-steps", "1", "--batch-size", "2", "--eval", "off", "--output-dir", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "molting_run.json").read_text())
    assert record["data_hub"] == {"id": "acme/pairs", "revision": hub_data["commit"]}
    assert record["data"] == f"hub dataset acme/pairs@{hub_data['commit'][:12]}, split 'test'"
    assert record["config"]["columns"] == {"chosen": "response_a", "rejected": "response_b"}
    assert record["status"] == "completed"


# --------------------------------------------------------------------------- --columns


def test_columns_read_fields_from_other_columns():
    rows = [{"q": "a", "chosen": "old", "response_a": "x", "response_b": "y"}]
    renamed = rename_columns(rows, {"prompt": "q", "chosen": "response_a", "rejected": "response_b"}, "data.jsonl")
    assert renamed == [{"prompt": "a", "chosen": "x", "rejected": "y"}]  # the old chosen column gives way


def test_a_column_named_in_columns_that_a_row_lacks_is_a_data_error():
    rows = [{"response_a": "x", "response_b": "y"}, {"response_a": "x"}]
    with pytest.raises(DataError, match=r"data.jsonl, row 1: no column 'response_b' to read as 'rejected' "
                                        r"\(--columns\); its columns: response_a"):
        rename_columns(rows, {"chosen": "response_a", "rejected": "response_b"}, "data.jsonl")


@pytest.mark.parametrize("given, expected", [
    ("chosen=response_a, rejected=response_b", {"chosen": "response_a", "rejected": "response_b"}),
    ({"prompt": "question"}, {"prompt": "question"}),
    (None, {}),
])
def test_columns_parse_from_a_flag_or_a_recipe_mapping(given, expected):
    assert dict(RunConfig(plugins=("dpo",), columns=given).columns) == expected


@pytest.mark.parametrize("given", ["chosen", "chosen=", "=a", {"chosen": 3}])
def test_malformed_columns_are_refused(given):
    with pytest.raises(ValueError, match="columns must"):
        RunConfig(plugins=("dpo",), columns=given)


# --------------------------------------------------------------------------- the formats people publish


def test_hh_rlhf_text_splits_after_the_last_shared_assistant_turn():
    """A character-wise common prefix would cut "It is 6." / "It is 7" after "It is "; the turn boundary is kept."""
    row = split_prompt({"chosen": HH_CHOSEN, "rejected": HH_REJECTED})
    assert row["prompt"] == "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: And 3+3?\n\nAssistant:"
    assert row["chosen"] == " It is 6." and row["rejected"] == " It is 7, I think."
    assert row["prompt"] + row["chosen"] == HH_CHOSEN


def test_text_without_turns_splits_where_the_characters_first_differ_as_trl_does():
    from trl.data_utils import extract_prompt

    row = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    assert split_prompt(row) == extract_prompt(row)


SYSTEM = {"role": "system", "content": "Answer briefly."}
HISTORY = [SYSTEM, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
           {"role": "user", "content": "3+3?"}]


def test_conversational_pairs_with_system_turns_and_history_keep_the_history_in_the_prompt(demo_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    explicit = {"prompt": HISTORY, "chosen": [{"role": "assistant", "content": "6"}],
                "rejected": [{"role": "assistant", "content": "7"}]}
    implicit = {"chosen": HISTORY + explicit["chosen"], "rejected": HISTORY + explicit["rejected"]}
    text_prompt = {"prompt": "3+3?", "chosen": [{"role": "assistant", "content": "6"}],
                   "rejected": [{"role": "assistant", "content": "7"}]}
    h4 = {"prompt": "3+3?", **implicit}  # HuggingFaceH4/ultrafeedback_binarized: the prompt's text, whole exchanges
    formatted = [format_pairs([row], tokenizer, "pairs")[0] for row in (explicit, implicit, h4, text_prompt)]
    assert formatted[0] == formatted[1] == formatted[2]
    assert formatted[0] == {"prompt": "Answer briefly.\nQ: 2+2?\nA: 4</s>\nQ: 3+3?\nA:", "chosen": " 6</s>\n",
                            "rejected": " 7</s>\n", "templated": True}
    assert formatted[3] == {**formatted[0], "prompt": "Q: 3+3?\nA:"}


def test_a_row_that_fits_no_format_names_the_row_and_the_formats():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}]
    with pytest.raises(DataError, match=r"pairs.jsonl, row 1: missing column\(s\) rejected"):
        check_columns(rows, SCHEMAS, "pairs.jsonl", "preference")
    with pytest.raises(DataError, match=r"has columns \(answer, question\); the preference stage needs "
                                        r"\(prompt, chosen, rejected\) or \(chosen, rejected\)"):
        check_columns([{"question": "q", "answer": "a"}], SCHEMAS, "pairs.jsonl", "preference")


def test_the_rule_judge_reads_a_solution_column_when_there_is_no_answer():
    from molting.plugins.rule_judge import RuleParams, rule_scores

    scores = rule_scores(["1+1?", "2+2?"], ["It is 2", "It is 5"], RuleParams(), solution=["\\boxed{2}", "4"])
    assert scores == [1.0, 0.0]
