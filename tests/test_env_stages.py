"""The online stages on episodes (``--env``): grpo, ppo and sample-pairs roll out whole episodes, the environment's
tokens stay out of the loss, its reward ranks and trains, and bad settings are refused by name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import molting
from molting.discovery import load_plugins
from molting.errors import ConfigError, PluginError
from molting.pipeline import run
from molting.resolve import resolve_config

from conftest import run_molting
from scripted import mixed_student, sampler_plugin

SEEN: list = []  # what the recording loss was handed


class Recorder:
    """The built-in grpo loss under another name, keeping the inputs the stage hands it."""

    @molting.hookimpl
    def molting_register_losses(self, register):
        grpo = load_plugins().get("loss", "grpo")

        def compute(inputs, params):
            SEEN.append(inputs)
            return grpo.compute(inputs, params)

        register(molting.Loss(name="recording", compute=compute, params=grpo.params, stage="grpo",
                              description="Records what it is handed."))


def host_with(*plugins):
    host = load_plugins()
    for number, plugin in enumerate(plugins):
        host.register(plugin, f"test-plugin-{number}")
    return host


def run_env(tmp_path: Path, plugin: str, host, **settings):
    from molting.demo import demo_model_dir

    flags = {"model": str(demo_model_dir()), "env": "calculator", "output_dir": str(tmp_path / "run"),
             "batch_size": 4, "max_steps": 2, "logging_steps": 1, "learning_rate": 1e-4, "max_new_tokens": 96,
             "max_episode_tokens": 256, "eval": "off", "sampler": "mixed", **settings}
    config, steps = resolve_config(host, [plugin], flags=flags)
    results = run(config, steps, host)
    return results, [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_grpo_trains_on_episodes_with_the_environments_tokens_masked(tmp_path):
    SEEN.clear()
    host = host_with(sampler_plugin("mixed", mixed_student), Recorder())
    _, records = run_env(tmp_path, "recording", host, num_generations=4, max_steps=1)
    logged = records[0]
    assert logged["env/turns"] == 2.0 and logged["env/tool_calls"] == 1.0 and logged["tools/failure_frequency"] == 0.0
    assert 0.0 < logged["env/reward"] < 1.0 and logged["reward"] == logged["env/reward"]  # no judges: the env's
    assert logged["reward_std"] > 0 and logged["frac_reward_zero_std"] == 0.0  # a right and a wrong answer per group
    inputs = SEEN[0]
    mask = inputs.mask
    for row in mask.tolist():  # the call turn, the tool's result (masked), then the answer turn
        first_gap = row.index(0)
        assert 1 in row[first_gap:], row
    assert (inputs.advantages > 0).any() and (inputs.advantages < 0).any()
    assert inputs.num_items_in_batch == mask.sum()


def test_ppo_trains_on_episodes(tmp_path):
    host = host_with(sampler_plugin("mixed", mixed_student))
    _, records = run_env(tmp_path, "ppo", host, batch_size=4, num_mini_batches=2, num_ppo_epochs=1, max_steps=2)
    steps = [r for r in records if "objective/scores" in r]
    assert len(steps) == 2 and any(r["env/reward"] > 0 for r in steps)
    logged = steps[-1]
    assert logged["env/turns"] == 2.0 and 0.0 <= logged["env/reward"] <= 1.0
    assert logged["objective/scores"] == logged["env/reward"]  # no judges: the environment's reward is the score
    assert all(isinstance(logged[k], float) for k in ("loss/policy_avg", "loss/value_avg", "objective/kl"))


def test_sample_pairs_ranks_whole_episodes_and_dpo_trains_on_them(tmp_path):
    from molting import demo

    host = host_with(sampler_plugin("mixed", mixed_student))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in demo.tool_prompt_rows("train", 6)))
    recipe = {"model": str(demo.demo_model_dir()), "output_dir": str(tmp_path / "run"), "eval": "off", "max_steps": 2,
              "stages": [{"plugin": "sample-pairs", "env": "calculator", "data": str(prompts), "max_new_tokens": 96,
                          "max_episode_tokens": 256, "sampler": "mixed", "num_samples": 2},
                         {"plugin": "dpo", "batch_size": 2}]}
    config, steps = resolve_config(host, [], recipe=recipe)
    run(config, steps, host)
    pairs = [json.loads(line) for line in (tmp_path / "run" / "1-sample-pairs" / "data.jsonl").read_text().splitlines()]
    assert len(pairs) >= 2  # a prompt whose two episodes both went right (or wrong) is a tie: no pair
    assert all((p["score_chosen"], p["score_rejected"]) == (1.0, 0.0) for p in pairs)
    pair = pairs[0]
    assert [m["role"] for m in pair["chosen"]] == ["assistant", "tool", "assistant"]
    assert pair["chosen"][0]["tool_calls"][0]["function"]["name"] == "calculator"
    assert pair["chosen"][-1]["content"] != pair["rejected"][-1]["content"]
    assert pair["tools"][0]["function"]["name"] == "calculator"
    assert (tmp_path / "run" / "2-dpo" / "model.safetensors").exists()


def test_env_for_a_stage_without_episodes_is_refused():
    host = load_plugins()
    with pytest.raises(ConfigError, match="--env calculator: no stage of this run \\(preference\\) rolls out episodes"):
        resolve_config(host, ["dpo"], flags={"env": "calculator"})
    with pytest.raises(PluginError, match="no environment named 'abacus'.*calculator"):
        resolve_config(host, ["grpo"], flags={"env": "abacus"})


def test_env_args_are_checked_against_the_environments_settings(tmp_path):
    host = host_with(sampler_plugin("mixed", mixed_student))
    with pytest.raises(ConfigError, match=r"invalid env_args for environment 'calculator': .*timeout_s.*"
                                          r"\(its settings: tool_timeout\)"):
        run_env(tmp_path, "grpo", host, env_args={"timeout_s": 3}, num_generations=4)


def test_an_episode_budget_past_max_length_is_refused(tmp_path):
    host = host_with(sampler_plugin("mixed", mixed_student))
    with pytest.raises(ConfigError, match=r"max_length \(128\) must exceed max_episode_tokens \(256\)"):
        run_env(tmp_path, "grpo", host, max_length=128, num_generations=4)


def test_the_cli_runs_grpo_on_calculator_episodes_and_shows_their_figures(tmp_path, demo_model):
    result = run_molting("run", "--plugin", "grpo", "--env", "calculator", "--model", str(demo_model),
                         "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "4",
                         "--set", "num_generations=4", "--set", "max_new_tokens=24", "--max-turns", "2",
                         "--eval", "off", "--logging-steps", "1")
    assert result.returncode == 0, result.stderr
    assert "episodes of calculator (up to 2 turns, 48 tokens)" in result.stderr
    assert "rewards environment calculator x1" in result.stderr
    assert re.search(r"'env/turns': '[0-9.]+'", result.stdout + result.stderr)
    record = json.loads((tmp_path / "out" / "molting_run.json").read_text())
    assert record["config"]["env"] == "calculator" and record["config"]["max_turns"] == 2


def test_the_calculator_recipe_runs_its_steps_and_prints_the_episodes_before_and_after(tmp_path):
    """examples/calculator/recipe.yaml, each step cut to 2 optimizer steps: the SFT of demo-tools on demonstrations,
    then GRPO on calculator episodes, evaluated on the 256 held-out sums before and after (docs/environments.md has the
    full run's figures)."""
    recipe = Path(__file__).resolve().parents[1] / "examples" / "calculator" / "recipe.yaml"
    out = tmp_path / "calculator"
    result = run_molting("run", "--config", str(recipe), "--output-dir", str(out), "--max-steps", "2",
                         "--logging-steps", "1", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "256 held-out episodes of 'calculator'" in result.stderr
    assert re.search(r"tool_call_rate +[0-9.]+ +[0-9.]+", result.stderr)
    record = json.loads((out / "2-grpo" / "molting_run.json").read_text())
    episodes = record["eval_episodes"]
    assert episodes["environment"] == "calculator" and episodes["rows"] == 256
    assert set(episodes["before"]) == set(episodes["after"]) >= {"reward", "tool_call_rate", "malformed_rate"}
    assert "## Held-out episodes (calculator)" in (out / "2-grpo" / "README.md").read_text()
    logged = [json.loads(line) for line in (out / "2-grpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("env/tool_calls" in r for r in logged)


def held_out_episodes(model_dir: Path, rows: int) -> dict[str, float]:
    """The calculator's figures for greedy episodes of ``model_dir`` on the first ``rows`` held-out sums."""
    from molting import demo
    from molting.environments import EpisodeRunner, RolloutSettings, evaluate_episodes
    from molting.models import load_causal_lm

    host = load_plugins()
    environment = host.get("environment", "calculator")
    runner = EpisodeRunner(environment, environment.params(), host.get("tool_parser", "hermes"),
                           RolloutSettings(max_turns=3, max_new_tokens=96, max_episode_tokens=256))
    model, tokenizer = load_causal_lm(model_dir)
    metrics, _ = evaluate_episodes(model.eval(), tokenizer, runner, demo.tool_prompt_rows("test", rows))
    return metrics


@pytest.mark.slow
def test_a_short_sft_of_demo_tools_on_the_demonstrations_makes_it_use_the_calculator_for_sums(tmp_path):
    """The calculator demo's first step, cut short (192 steps of 8 where the recipe takes 768): demo-tools gets none
    of the 3- and 4-digit sums, and does not call a tool it has not seen; after the SFT it calls the calculator with
    the question's numbers and answers with its result (0.86 of the 256 held-out sums here; the recipe's full SFT
    0.99)."""
    from molting.models import resolve_model_path

    before = held_out_episodes(resolve_model_path("demo-tools"), 32)
    assert before["reward"] == 0.0 and before["tool_call_rate"] == 0.0
    result = run_molting("run", "--plugin", "sft", "--model", "demo-tools", "--data", "demo-tool-sft",
                         "--learning-rate", "1e-3", "--batch-size", "8", "--max-steps", "192", "--eval", "off",
                         "--precision", "fp32", "--output-dir", str(tmp_path / "sft"))
    assert result.returncode == 0, result.stderr[-3000:]
    after = held_out_episodes(tmp_path / "sft", 32)
    assert after["tool_call_rate"] == 1.0 and after["malformed_rate"] == 0.0
    assert after["reward"] >= 0.6
