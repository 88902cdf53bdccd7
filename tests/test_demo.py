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


def test_built_in_models_resolve_by_name_and_a_local_directory_of_that_name_wins(tmp_path, monkeypatch):
    from molting.errors import ModelError
    from molting.models import resolve_model_path

    assert resolve_model_path(None) == resolve_model_path("demo") == demo.MODEL_DIR
    assert resolve_model_path("demo-tools") == demo.TOOL_MODEL_DIR
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo-tools").mkdir()
    assert resolve_model_path("demo-tools") == tmp_path / "demo-tools"
    with pytest.raises(ModelError, match=r"'demo:tools' is not .* nor a built-in model \(demo, demo-tools\)"):
        resolve_model_path("demo:tools")


def test_shipped_tool_model_shares_the_tokenizer_and_quotes_numbers_the_demo_model_cannot():
    """demo-tools (``build_demo_model.py --tools``) quotes the last line's numbers after words or inside JSON, as its
    copying problems taught it (on numbers they did not hold); the demo model, trained on sums alone, does not. (What
    the calculator's turns quote, after ``What is`` and ``The answer is``, the demo's SFT teaches.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo.demo_model_dir("demo-tools")
    assert sum(p.stat().st_size for p in path.iterdir()) < 10 * 2**20
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.get_vocab() == demo.build_tokenizer().get_vocab()
    assert tokenizer.chat_template == demo.CHAT_TEMPLATE
    assert json.loads((path / "build_info.json").read_text())["copying"] == 0.5
    numbers = ["4821 + 377", "9035", "62 + 7140", "318 - 5506", "7777 + 1234", "80, 4411"]
    prompts = [f"Q: {n}?\nA: {{\"value\": \"" for n in numbers] + [f"R: {n}\nA: answer" for n in numbers]
    wanted = [f'{n}"}}' for n in numbers] + [f" {n}" for n in numbers]

    def quoted(model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        right = 0
        for prompt, want in zip(prompts, wanted):
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            right += tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).startswith(want)
        return right / len(prompts)

    assert quoted(path) >= 0.5  # 7 of the 12 exactly here
    assert quoted(demo.demo_model_dir()) == 0.0
