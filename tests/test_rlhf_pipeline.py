"""The three phases in one command: SFT → reward model → PPO on the demo, and its measured effect."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import run_molting

# A shortened recipe of `molting run --plugin sft --plugin reward-model --plugin ppo`: fewer steps per stage,
# the demo evaluation only after PPO. The effect holds on seeds 0-2 (benchmarks/rlhf_seeds.py prints them).
RECIPE = {
    "stages": [
        {"plugin": "sft", "max_steps": 16, "eval": "off"},
        {"plugin": "reward-model", "max_steps": 48, "eval": "off"},
        {"plugin": "ppo", "max_steps": 40, "eval": "off", "eval_prompts": 96,
         "judge_args": {"reward-model": {"batch_size": 8}}},
    ],
}


def rlhf(tmp_path, seed: int):
    recipe = tmp_path / "rlhf.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "seed": seed, "output_dir": str(tmp_path / "out")}))
    result = run_molting("run", "--config", str(recipe))
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp_path / "out", result.stderr


@pytest.mark.slow
def test_sft_reward_model_ppo_raises_the_judge_reward_on_held_out_prompts(tmp_path):
    out, log = rlhf(tmp_path, seed=0)
    sft, rm, ppo = (json.loads((out / name / "molting_run.json").read_text()) for name in ("1-sft", "2-reward-model", "3-ppo"))
    assert rm["model"] == str(out / "1-sft") and ppo["model"] == str(out / "1-sft")  # SFT: PPO's policy and reference
    assert f"critic from {out / '2-reward-model'}" in log and "rewards reward-model" in log
    assert rm["metrics"]["eval_accuracy"] > 0.7
    metrics = ppo["metrics"]
    assert "held-out judge reward (reward-model)" in log
    # the measured effect: the reward model's mean reward of held-out answers rises well beyond sampling noise
    assert metrics["eval_reward_after"] > metrics["eval_reward_before"] + 0.3, metrics  # seeds 0-2: +0.88, +0.53, +0.59
    for stage in ("1-sft", "2-reward-model", "3-ppo"):
        assert (out / stage / "README.md").exists()
    # and the demo task's own judge (right sum + persona style) of the same answers rises too
    assert metrics["eval_judge_after"] > metrics["eval_judge_before"] + 0.03, metrics  # seeds 0-2: +0.05, +0.12, +0.07
    assert "demo judge" in log
    # the PPO step's recipe reruns it alone: its judge keeps the user's setting and the reward model it was given
    rerun = yaml.safe_load((out / "3-ppo" / "recipe.yaml").read_text())
    assert rerun["judge_args"] == {"reward-model": {"batch_size": 8, "model": str(out / "2-reward-model")}}
    card = (out / "2-reward-model" / "README.md").read_text()
    assert f'AutoModelForSequenceClassification.from_pretrained("{out / "2-reward-model"}")' in card
