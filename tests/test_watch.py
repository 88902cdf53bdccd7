"""Evaluation during training, the best model kept, and the reward-hacking watch."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from molting.data import hold_out
from molting.errors import ConfigError, DataError
from molting.watch import BestKeeper, HackingWatch

from conftest import run_molting


def scores(correct: int, n: int = 100) -> list[float]:
    return [1.0] * correct + [0.0] * (n - correct)


def test_the_watch_fires_when_the_training_reward_rises_and_the_held_out_score_falls(capsys):
    watch = HackingWatch(window=3)
    assert watch.observe(0, None, scores(60), 10) == []
    assert watch.observe(10, 0.2, scores(55), 10) == []  # two evaluations: not a window yet
    alarms = watch.observe(20, 0.8, scores(40), 10)
    assert [a["kind"] for a in alarms] == ["reward-diverges"] and alarms[0]["steps"] == [0, 20]
    assert "rose 0.200 -> 0.800" in alarms[0]["message"] and "fell 0.600 -> 0.400" in alarms[0]["message"]
    assert "possible reward hacking at step 20" in capsys.readouterr().err
    watch.observe(30, 0.9, scores(30), 10)
    assert "possible reward hacking" not in capsys.readouterr().err  # recorded again, printed once
    assert len(watch.alarms) == 2 and watch.summary()["fired"]


@pytest.mark.parametrize("train, held_out", [
    ([0.2, 0.5, 0.8], [60, 59, 58]),  # the held-out score barely moves: within its noise
    ([0.8, 0.5, 0.2], [60, 50, 40]),  # both fall: a bad run, not a hacked reward
    ([0.2, 0.5, 0.8], [40, 50, 60]),  # both rise: a healthy run
])
def test_the_watch_stays_silent_without_the_divergence(train, held_out):
    watch = HackingWatch(window=3)
    for step, (reward, correct) in enumerate(zip(train, held_out)):
        watch.observe(step, reward, scores(correct), 10)
    assert not watch.summary()["fired"]


def test_the_fall_is_tested_paired_on_the_same_prompts():
    # the same 4-point fall (0.50 -> 0.46 on 400 prompts), within the noise of two independent means (±0.07)
    before = [1.0] * 200 + [0.0] * 200
    watch = HackingWatch(window=2)  # 16 prompts answered right before and wrong after, none the other way
    watch.observe(0, 0.1, before, 10)
    assert watch.observe(1, 0.5, [1.0] * 184 + [0.0] * 216, 10)[0]["kind"] == "reward-diverges"
    churn = HackingWatch(window=2)  # 200 prompts wrong after, 184 right after: noise, not a fall
    churn.observe(0, 0.1, before, 10)
    assert churn.observe(1, 0.5, [0.0] * 200 + [1.0] * 184 + [0.0] * 16, 10) == []


def test_the_watch_fires_on_length_and_kl():
    watch = HackingWatch(window=3, length_factor=2.0, max_kl=5.0)
    watch.observe(0, None, scores(50), 10.0, kl=0.0)
    assert watch.observe(1, 0.1, scores(50), 19.0, kl=4.0) == []
    kinds = [a["kind"] for a in watch.observe(2, 0.1, scores(50), 21.0, kl=6.0)]
    assert kinds == ["length", "kl"]


def test_the_best_model_is_kept_by_the_metric_s_direction(tmp_path):
    def save(directory):
        directory.mkdir()
        (directory / "weights").write_text(str(step))

    keeper = BestKeeper("eval_loss", tmp_path)
    for step, loss in enumerate([0.7, 0.5, 0.6]):
        keeper.consider({"eval_loss": loss}, step, save)
    assert keeper.best["step"] == 1 and (tmp_path / "best" / "weights").read_text() == "1"
    assert not list(tmp_path.glob(".staging*"))
    rewarded = BestKeeper("reward", tmp_path / "r")
    (tmp_path / "r").mkdir()
    for step, reward in enumerate([0.1, 0.5, 0.3]):
        rewarded.consider({"eval_reward": reward}, step, save)  # "reward" finds eval_reward; higher is better
    assert rewarded.best["step"] == 1 and rewarded.best["direction"] == "max"
    assert BestKeeper("eval_reward:min", tmp_path).lower
    with pytest.raises(ConfigError, match="logged no such metric; it logged eval_accuracy"):
        BestKeeper("eval_bleu", tmp_path).consider({"eval_accuracy": 0.5}, 0, save)


def test_held_out_rows_are_the_same_for_the_same_seed_and_disjoint():
    import datasets

    rows = [{"prompt": str(i)} for i in range(100)]
    train, held = hold_out(rows, 0.1, 3, "data")
    assert len(held) == 10 and len(train) == 90 and hold_out(rows, 0.1, 3, "data") == (train, held)
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in held)
    assert hold_out(rows, 0.1, 4, "data")[1] != held
    train_set, held_set = hold_out(datasets.Dataset.from_list(rows), 0.1, 3, "data")
    assert len(held_set) == 10 and set(held_set["prompt"]).isdisjoint(train_set["prompt"])
    with pytest.raises(DataError, match="--eval-split 0.01 of data's 20 rows leaves no rows to evaluate on"):
        hold_out(rows[:20], 0.01, 0, "data")


def test_dpo_evaluates_held_out_pairs_and_keeps_the_best(tmp_path):
    out = tmp_path / "out"
    result = run_molting("run", "--plugin", "dpo", "--eval-split", "0.1", "--eval-steps", "16", "--max-steps", "48",
                         "--keep-best", "eval_loss", "--eval", "off", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [log for log in logs if "eval_loss" in log]
    assert [log["step"] for log in evaluated] == [16, 32, 48]
    assert {"eval_rewards/chosen", "eval_rewards/margins", "eval_rewards/accuracies"} <= set(evaluated[0])
    record = json.loads((out / "molting_run.json").read_text())
    assert record["eval_data"] == {"source": "dataset 'demo-preference' (train split), 51 rows held out (--eval-split "
                                             "0.1, seed 42)", "rows": 51, "fraction": 0.1, "seed": 42}
    best = min(evaluated, key=lambda log: log["eval_loss"])
    assert record["best"]["step"] == best["step"] and record["best"]["value"] == pytest.approx(best["eval_loss"])
    assert record["metrics"]["eval_loss"] == pytest.approx(evaluated[-1]["eval_loss"])
    assert "best eval_loss" in result.stderr
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "best")
    card = (out / "README.md").read_text()
    assert "## Held-out evaluation during training" in card and f"step {best['step']}" in card


def test_sft_evaluates_on_held_out_data_of_its_own(tmp_path):
    data = tmp_path / "heldout.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Q: What is {a} + 1?\nA:", "completion": f" The answer is {a + 1}."})
                              for a in range(12)))
    out = tmp_path / "out"
    result = run_molting("run", "--plugin", "sft", "--eval-data", str(data), "--max-steps", "4", "--eval", "off",
                         "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "molting_run.json").read_text())
    assert record["eval_data"]["source"] == str(data) and record["eval_data"]["rows"] == 12
    assert "eval_loss" in record["metrics"] and "best" not in record


@pytest.mark.parametrize("plugin, metric", [("kto", "eval_rewards/chosen"), ("reward-model", "eval_accuracy")])
def test_every_offline_stage_evaluates_its_held_out_split(plugin, metric, tmp_path):
    out = tmp_path / "out"
    result = run_molting("run", "--plugin", plugin, "--eval-split", "0.05", "--max-steps", "4", "--eval", "off",
                         "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "molting_run.json").read_text())["metrics"]
    assert "eval_loss" in metrics and metric in metrics, sorted(metrics)
    assert "does not evaluate during training" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--keep-best", "eval_loss"], "give --eval-data or --eval-split"),
    (["--eval-split", "0.1", "--eval-data", "demo-preference"], "not both"),
    (["--eval-split", "1.5"], "eval_split must be a fraction between 0 and 1"),
])
def test_evaluation_settings_that_cannot_work_are_refused(args, message, tmp_path):
    result = run_molting("run", "--plugin", "dpo", "--output-dir", str(tmp_path / "out"), *args)
    assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]


# The demo's reward hacking (docs/rlhf.md): the reward model learns the style, not the sums, so PPO raises its reward
# while greedy correctness on held-out prompts falls. The watch sees it in the first evaluations and stops the run.
HACKED = {
    "seed": 0,
    "stages": [
        {"plugin": "sft", "eval": "off"},
        {"plugin": "reward-model", "max_steps": 48, "eval": "off"},
        {"plugin": "ppo", "max_steps": 48, "eval": "off", "eval_prompts": 0, "eval_data": "demo-prompts",
         "eval_data_split": "test", "eval_judges": {"rule": 1.0}, "eval_steps": 16, "eval_temperature": 0,
         "eval_max_prompts": 256, "hacking_length_factor": 5.0, "stop_on_hacking": True},
    ],
}


def test_the_watch_catches_the_demo_ppo_exploiting_its_reward_model(tmp_path):
    recipe = tmp_path / "rlhf.yaml"
    recipe.write_text(yaml.safe_dump({**HACKED, "output_dir": str(tmp_path / "out")}))
    result = run_molting("run", "--config", str(recipe))
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out" / "3-ppo"
    record = json.loads((out / "molting_run.json").read_text())
    watch = record["watch"]
    assert watch["fired"] and watch["alarms"][0]["kind"] == "reward-diverges", watch
    rise, fall = watch["alarms"][0]["train_reward"], watch["alarms"][0]["held_out"]
    assert rise[1] > rise[0] and fall[1] < fall[0] - 0.05
    assert watch["stopped_at"] == watch["alarms"][0]["step"] < 48 and "possible reward hacking" in result.stderr
    # the best held-out model is kept: the one before the reward model was exploited
    assert record["best"]["metric"] == "eval_reward" and record["best"]["step"] < watch["stopped_at"]
    assert (out / "best" / "model.safetensors").exists() and record["status"] == "completed"
    assert "possible reward hacking" in (out / "README.md").read_text()
    # and the report shows it: the alarm in a banner, the training reward against the held-out judges
    assert run_molting("report", str(tmp_path / "out")).returncode == 0
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count('class="alarm"') == 1 and "training reward against the held-out judges" in page


def test_a_healthy_grpo_run_keeps_the_watch_silent(tmp_path):
    out = tmp_path / "out"
    result = run_molting("run", "--plugin", "grpo", "--eval-data", "demo-prompts", "--eval-data-split", "test",
                         "--eval-judge", "rule", "--eval-steps", "40", "--max-steps", "80", "--set", "eval_max_prompts=128",
                         "--eval", "off", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads((out / "molting_run.json").read_text())
    steps = [e["step"] for e in record["watch"]["evaluations"]]
    assert steps == [0, 40, 80] and not record["watch"]["fired"], record["watch"]
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [log["step"] for log in logs if "eval_reward" in log] == steps
    assert "possible reward hacking" not in result.stderr


def test_a_resumed_ppo_run_keeps_its_watch(tmp_path):
    """The watch's evaluations travel in PPO's checkpoints: a run resumed half way records what the whole one did."""
    args = ["run", "--plugin", "ppo", "--judge", "rule", "--max-steps", "8", "--batch-size", "4", "--eval", "off",
            "--set", "eval_prompts=0", "--eval-data", "demo-prompts", "--eval-data-split", "test", "--eval-steps", "4",
            "--set", "eval_max_prompts=16", "--save-steps", "4"]
    out = tmp_path / "out"
    assert run_molting(*args, "--output-dir", str(out)).returncode == 0
    whole = tmp_path / "whole"
    shutil.copytree(out, whole)
    for path in out.iterdir():  # back to the state of a run killed after its checkpoint at step 4
        if path.name not in ("checkpoint-4", "molting_run.json"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = run_molting(*args, "--output-dir", str(out), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = (json.loads((d / "molting_run.json").read_text())["watch"]["evaluations"] for d in (whole, out))
    assert [e["step"] for e in got] == [0, 4, 8]
    for ours, theirs in zip(got, expected):
        assert ours["held_out"] == pytest.approx(theirs["held_out"], abs=1e-5)
        assert ours["train_reward"] == pytest.approx(theirs["train_reward"], abs=1e-5)
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and samples == [json.loads(line) for line in (whole / "eval_samples.jsonl").read_text().splitlines()]
