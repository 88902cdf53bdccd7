"""The sample-pairs stage: ties, pairwise judges, chat prompts and judge errors (ranking itself: test_ranking.py)."""

from __future__ import annotations

import json

import pytest

import molting
from molting.components import Judge
from molting.discovery import load_plugins
from molting.errors import DataError, JudgeError
from molting.pipeline import run
from molting.resolve import resolve_config


class Judges:
    @molting.hookimpl
    def molting_register_judges(self, register):
        register(Judge(name="constant", score=lambda p, c, params: [1.0] * len(p), description="Always 1."))
        register(Judge(name="short", score=lambda p, c, params: [1.0 if len(x) < 20 else 0.0 for x in c],
                       description="Short answers win.", kind="pointwise"))

        def broken(prompts, completions, params):
            if any("17" in p for p in prompts):
                raise ValueError("cannot read this prompt")
            return [0.0] * len(prompts)

        register(Judge(name="broken", score=broken, description="Raises on some prompts."))


def host_with_judges():
    host = load_plugins(disabled=[])
    host.register(Judges(), "judges")
    return host


def write(tmp_path, rows):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_judge_that_cannot_tell_answers_apart_writes_no_pairs_and_says_why(tmp_path):
    from molting import demo

    host = host_with_judges()
    config, steps = resolve_config(host, ["sample-pairs"], flags={
        "data": write(tmp_path, demo.prompt_rows("train", 4)), "judges": {"constant": 1.0},
        "output_dir": str(tmp_path / "out"),
    })
    with pytest.raises(DataError, match="wrote no pairs.*all 4 answers scored the same"):
        run(config, steps, host)


def test_a_raising_judge_names_itself_and_the_data_row(tmp_path):
    rows = [{"prompt": f"Q: What is {a} + 10?\nA:"} for a in (11, 12, 17, 19)]
    host = host_with_judges()
    config, steps = resolve_config(host, ["sample-pairs"], flags={
        "data": write(tmp_path, rows), "judges": {"broken": 1.0}, "output_dir": str(tmp_path / "out"), "num_samples": 2,
    })
    with pytest.raises(JudgeError, match=r"judge 'broken' raised ValueError: cannot read this prompt .* data row 2 "):
        run(config, steps, host)


def test_chat_prompts_give_chat_pairs_the_preference_stage_reads(tmp_path):
    from molting import demo

    rows = [{"prompt": [{"role": "user", "content": r["prompt"][3:-3]}], "answer": r["answer"]}
            for r in demo.prompt_rows("train", 12)]
    host = host_with_judges()
    out = tmp_path / "out"
    config, steps = resolve_config(host, ["sample-pairs", "dpo"], flags={
        "data": write(tmp_path, rows), "judges": {"short": 1.0}, "output_dir": str(out), "max_steps": 1,
        "eval": "off", "num_samples": 6,
    })
    pairs_metrics, dpo_metrics = run(config, steps, host)
    written = [json.loads(line) for line in (out / "1-sample-pairs" / "data.jsonl").read_text().splitlines()]
    assert written and pairs_metrics["pairs"] == len(written)
    for row in written:
        assert row["prompt"][0]["role"] == "user"
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert len(row["chosen"][0]["content"]) < 20 <= len(row["rejected"][0]["content"]) + 1
    assert "train_loss" in dpo_metrics


def test_on_your_own_data_the_judge_must_be_named(tmp_path):
    from molting.errors import ConfigError

    host = load_plugins(disabled=[])
    config, steps = resolve_config(host, ["sample-pairs"], flags={
        "data": write(tmp_path, [{"prompt": "Write a haiku."}]), "output_dir": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match="--judge rule, --judge reward-model"):
        run(config, steps, host)


def test_chat_prompts_need_a_chat_template(demo_model):
    from transformers import AutoTokenizer

    from molting.sampling import prompt_texts

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="prompt 1 is a message list, but the model's tokenizer has no chat template"):
        prompt_texts(["Q: 1 + 1?", [{"role": "user", "content": "1 + 1?"}]], tokenizer)
