"""`molting run --plugin dpo` end to end, as a user runs it, and the errors bad input gets."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from conftest import run_molting

TRL_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, demo_model):
    out = tmp_path_factory.mktemp("run") / "dpo-out"
    result = run_molting("run", "--plugin", "dpo", "--max-steps", "16", "--logging-steps", "1", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_output_dir_loads_with_plain_transformers(dpo_run, demo_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = dpo_run
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin*"))
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(demo_model)
    changed = [n for (n, p), q in zip(model.named_parameters(), start.parameters()) if not torch.equal(p, q)]
    assert len(changed) > 10  # training changed the weights
    ids = tokenizer("Q: What is 12 + 30?\nA:", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4


def test_metrics_use_trl_names_start_at_ln2_and_margins_rise(dpo_run):
    out, result = dpo_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 16
    for name in TRL_NAMES:
        assert name in steps[0], name
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    late = sum(r["rewards/margins"] for r in steps[-4:]) / 4
    assert late > 0.5
    assert sum(r["rewards/accuracies"] for r in steps[-4:]) / 4 > 0.6
    assert "%|" in result.stderr  # the progress bar


def test_run_record_has_resolved_config_and_plugin_versions(dpo_run):
    out, _ = dpo_run
    record = json.loads((out / "molting_run.json").read_text())
    assert record["status"] == "completed"
    assert (record["plugin"], record["stage"], record["loss"]) == ("dpo", "preference", "dpo")
    assert record["loss_params"] == {"beta": 0.1, "label_smoothing": 0.0}
    assert record["config"]["max_steps"] == 16
    assert record["plugins"]["dpo"] == {"distribution": "molting", "version": "0.1.0", "status": "ok"}
    assert record["metrics"]["train_loss"] < math.log(2)


def test_recipe_yaml_reruns_the_run(dpo_run, tmp_path):
    out, _ = dpo_run
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["plugin"] == "dpo" and recipe["beta"] == 0.1 and recipe["max_steps"] == 16
    again = tmp_path / "again"
    result = run_molting("run", "--config", str(out / "recipe.yaml"), "--max-steps", "1", "--output-dir", str(again))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((again / "molting_run.json").read_text())["config"]["max_steps"] == 1


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "make_args, expected",
    [
        (lambda d: ["--data", write(d / "bad.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n')],
         "bad.jsonl, line 2: malformed JSON"),
        (lambda d: ["--data", write(d / "cols.jsonl", '{"question": "a", "answer": "b"}\n')],
         "has columns (answer, question); the preference stage needs (prompt, chosen, rejected)"),
        (lambda d: ["--data", write(d / "empty.jsonl", "")], "empty.jsonl has no rows"),
        (lambda d: ["--plugin", "nope"], "no loss or stage named 'nope'"),
        (lambda d: ["--model", str(d)], "has no config.json: not a transformers model directory"),
        (lambda d: ["--set", "betta=1"], "unknown config key 'betta'"),
    ],
)
def test_bad_input_gets_a_one_line_error_not_a_traceback(tmp_path, demo_model, make_args, expected):
    args = make_args(tmp_path)
    if "--plugin" not in args:
        args = ["--plugin", "dpo", *args]
    result = run_molting("run", *args, "--max-steps", "1", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
