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
    """The main job exactly as README gives it: `molting run --plugin dpo` on the built-in defaults."""
    out = tmp_path_factory.mktemp("run") / "molting-output"
    result = run_molting("run", "--plugin", "dpo", cwd=out.parent)
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
    assert steps[0]["step"] == 1 and steps[-1]["step"] == 190  # 512 pairs, batch 8, 3 epochs: 192 steps, logged every 5
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
    assert record["loss_params"] == {"beta": 0.3, "label_smoothing": 0.0}  # the demo model's β
    assert record["config"]["output_dir"] == "molting-output" and record["config"]["learning_rate"] == 5e-5
    assert record["plugins"]["dpo"] == {"distribution": "molting", "version": "0.1.0", "status": "ok"}
    assert record["metrics"]["train_loss"] < math.log(2)


def test_recipe_yaml_reruns_the_run(dpo_run, tmp_path):
    out, _ = dpo_run
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["plugin"] == "dpo" and recipe["beta"] == 0.3 and recipe["epochs"] == 3.0
    again = tmp_path / "again"
    result = run_molting("run", "--config", str(out / "recipe.yaml"), "--max-steps", "1", "--output-dir", str(again),
                         "--eval", "off")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((again / "molting_run.json").read_text())["config"]["max_steps"] == 1


def test_run_evaluates_before_and_after_and_the_persona_rate_rises(dpo_run):
    out, result = dpo_run
    evaluation = json.loads((out / "molting_run.json").read_text())["eval"]
    before, after = evaluation["before"], evaluation["after"]
    assert set(before) == {"correct", "persona", "judge"}
    assert set(after) == {"correct", "persona", "judge", "preference_accuracy", "win_rate"}
    assert 0.3 < before["persona"] < 0.7  # the demo model answers in either style
    assert after["persona"] >= 0.9  # DPO on the demo pairs makes the persona style the norm
    assert after["correct"] >= before["correct"] - 0.02  # without making the sums worse
    assert after["preference_accuracy"] > 0.9 and after["win_rate"] > 0.6
    assert "preference_accuracy" in result.stderr and "before" in result.stderr  # printed side by side


def test_model_card_describes_the_run(dpo_run):
    out, _ = dpo_run
    card = (out / "README.md").read_text()
    assert "Trained with molting 0.1.0: dpo (stage preference, loss dpo)." in card
    assert "## Held-out evaluation (demo task)" in card and "persona" in card
    assert "| beta | `0.3` |" in card and "| dpo | molting | 0.1.0 |" in card


def test_plot_writes_training_curves_and_the_evaluation(dpo_run, tmp_path):
    out, _ = dpo_run
    result = run_molting("plot", str(out), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for name in ("training.png", "eval.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_eval_command_reports_against_the_start_model(dpo_run):
    out, _ = dpo_run
    result = run_molting("eval", "--model", str(out), "--n", "32", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["baseline"].endswith("demo_model") and report["prompts"] == 32
    assert set(report["demo"]["model"]) == {"correct", "persona", "judge", "preference_accuracy", "win_rate"}
    assert report["demo"]["model"]["persona"] > 0.8
    # the general figures: the demo's rule judge of both sides, the win rate, the KL, the preference accuracy
    assert set(report["judges"]["demo-rule"]) == {"model", "baseline"}
    assert report["win_rate"]["wins"] + report["win_rate"]["ties"] + report["win_rate"]["losses"] == 32
    assert report["win_rate"]["mean"] > 0.5 and report["kl"]["mean"] > 0
    assert report["preference_accuracy"]["mean"] > 0.8


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
    result = run_molting("run", *args, "--max-steps", "1", "--eval", "off", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_report_to_tensorboard_uses_the_trainer_integration(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    result = run_molting("run", "--plugin", "dpo", "--max-steps", "2", "--logging-steps", "1", "--report-to",
                         "tensorboard", "--eval", "off", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    events = list(out.glob("runs/*/events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
