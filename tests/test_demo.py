"""The built-in demo task: its data sets, its rule judge, and the model shipped in the package."""

from __future__ import annotations

import json

import pytest

from molting import demo


def test_held_out_problems_never_appear_in_training_data():
    test = set(demo.problems("test"))
    assert len(test) == 256 and not test & set(demo.problems("train"))
    for rows in (demo.sft_rows("train"), demo.preference_rows("train"), demo.prompt_rows("train")):
        for row in rows:
            a, b = map(int, demo.PROMPT.search(row["prompt"]).groups())
            assert (a, b) not in test


def test_sft_data_uses_both_styles_about_equally_and_is_correct():
    rows = demo.sft_rows("train")
    graded = [demo.grade(r["prompt"], r["completion"]) for r in rows]
    assert all(g["correct"] for g in graded)
    persona = sum(g["persona"] for g in graded) / len(graded)
    assert 0.4 < persona < 0.6


def test_preference_data_prefers_persona_and_correct_answers():
    rows = demo.preference_rows("train")
    for row in rows:
        chosen, rejected = demo.grade(row["prompt"], row["chosen"]), demo.grade(row["prompt"], row["rejected"])
        assert chosen == {"correct": True, "persona": True, "plain": False}
        assert not (rejected["correct"] and rejected["persona"])
        assert demo.score(row["prompt"], row["chosen"]) > demo.score(row["prompt"], row["rejected"])


def test_unpaired_and_prompt_rows():
    unpaired = demo.unpaired_rows("test", 10)
    assert len(unpaired) == 20 and sum(r["label"] for r in unpaired) == 10
    [row] = demo.prompt_rows("test", 1)
    a, b = map(int, demo.PROMPT.search(row["prompt"]).groups())
    assert row["answer"] == str(a + b)


@pytest.mark.parametrize(
    "completion, expected",
    [
        (" Arr! 12 plus 30 be 42, matey.", {"correct": True, "persona": True, "plain": False}),
        (" The answer is 42.", {"correct": True, "persona": False, "plain": True}),
        (" Arr! 12 plus 30 be 43, matey.", {"correct": False, "persona": True, "plain": False}),
        (" The answer is 42. Arr!", {"correct": False, "persona": False, "plain": False}),
        ("", {"correct": False, "persona": False, "plain": False}),
    ],
)
def test_rule_grading(completion, expected):
    assert demo.grade(demo.prompt_for(12, 30), completion) == expected


def test_data_is_deterministic():
    assert demo.preference_rows("train") == demo.preference_rows("train")
    assert demo.sft_rows("test", 5) == demo.sft_rows("test", 5)


def test_shipped_model_is_small_loads_and_matches_its_build_code():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo.demo_model_dir()
    size = sum(p.stat().st_size for p in path.iterdir())
    assert size < 10 * 2**20
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama" and 3e6 < model.num_parameters() < 4e6
    rebuilt = demo.build_tokenizer()
    assert rebuilt.get_vocab() == tokenizer.get_vocab()
    info = json.loads((path / "build_info.json").read_text())
    assert 0.3 < info["held_out"]["sampled_persona"] < 0.7  # room for preference training
