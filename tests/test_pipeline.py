"""Pipelines: several stages in one run, each feeding the next; per-stage recipe keys; skip and --force."""

from __future__ import annotations

import json

import pytest
import yaml

import molting
from molting.discovery import load_plugins
from molting.errors import ConfigError
from molting.pipeline import run
from molting.resolve import resolve_config

from conftest import run_molting


def record(path):
    return json.loads((path / "molting_run.json").read_text())


def test_per_stage_keys_sit_between_the_recipe_and_the_flags():
    host = load_plugins(disabled=[])
    recipe = {
        "learning_rate": 1e-5,
        "stages": [
            {"plugin": "sample-pairs", "num_samples": 3, "learning_rate": 2e-5},
            {"plugin": "dpo", "beta": 0.2, "epochs": 2},
        ],
    }
    config, steps = resolve_config(host, [], recipe, flags={"max_steps": 7})
    assert [s.name for s in steps] == ["sample-pairs", "dpo"]
    first, second = (s.config for s in steps)
    assert first.learning_rate == 2e-5 and second.learning_rate == 1e-5  # the stage's key beats the recipe's
    assert first.loss_params["num_samples"] == 3 and second.loss_params["beta"] == 0.2
    assert second.epochs == 2 and first.epochs == 3  # 3: the demo default
    assert first.max_steps == second.max_steps == config.max_steps == 7  # run-wide flags reach every stage


def test_a_stage_key_that_stage_does_not_read_is_an_error_naming_the_stage():
    host = load_plugins(disabled=[])
    recipe = {"stages": [{"plugin": "sample-pairs", "beta": 0.2}, {"plugin": "dpo"}]}
    with pytest.raises(ConfigError, match=r"'beta' in recipe.yaml, stage 1 \(sample-pairs\)"):
        resolve_config(host, [], recipe, recipe_source="recipe.yaml")


@pytest.mark.parametrize("stages, message", [
    ([{"beta": 0.1}], "must be a mapping with a `plugin`"),
    ("dpo", "must be a list"),
    ([], "must be a list"),
])
def test_malformed_stage_lists_are_rejected(stages, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(load_plugins(disabled=[]), [], {"stages": stages})


def test_plugin_flags_must_agree_with_the_recipe_stages():
    host = load_plugins(disabled=[])
    with pytest.raises(ConfigError, match="lists the stages sample-pairs, dpo"):
        resolve_config(host, ["ipo"], {"stages": ["sample-pairs", "dpo"]})
    _, steps = resolve_config(host, ["sample-pairs", "dpo"], {"stages": ["sample-pairs", "dpo"]})
    assert len(steps) == 2


class FailOnce:
    """Makes the first run of the preference stage fail, as a crash would."""

    def __init__(self):
        self.failed = False

    @molting.hookimpl
    def molting_before_stage(self, stage, config):
        if stage.name == "preference" and not self.failed:
            self.failed = True
            raise RuntimeError("simulated crash in the second stage")


@pytest.mark.slow
def test_a_failed_stage_keeps_earlier_outputs_and_a_rerun_resumes_there(tmp_path):
    out = tmp_path / "out"
    flags = {"max_steps": 2, "output_dir": str(out), "eval": "off", "num_samples": 2, "judges": {"demo-rule": 1.0}}
    host = load_plugins(disabled=[])
    host.register(FailOnce(), "fail-once")
    config, steps = resolve_config(host, ["sample-pairs", "dpo"], flags={**flags, "data": _prompts(tmp_path)})
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(config, steps, host)
    pairs = out / "1-sample-pairs" / "data.jsonl"
    assert record(out / "1-sample-pairs")["status"] == "completed" and pairs.exists()
    assert record(out / "2-dpo")["status"] == "failed"
    written = pairs.read_text()

    result = run_molting("run", "--plugin", "sample-pairs", "--plugin", "dpo", "--max-steps", "2", "--output-dir",
                         str(out), "--eval", "off", "--set", "num_samples=2", "--data", _prompts(tmp_path),
                         "--judge", "demo-rule")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sample-pairs: already complete" in result.stderr
    assert pairs.read_text() == written
    assert record(out / "2-dpo")["status"] == "completed"
    assert record(out / "2-dpo")["model"] == record(out / "1-sample-pairs")["model"]  # no model from sample-pairs
    assert record(out / "2-dpo")["data"].startswith(f"{pairs} (made from ")

    again = run_molting("run", "--plugin", "sample-pairs", "--plugin", "dpo", "--max-steps", "2", "--output-dir",
                        str(out), "--eval", "off", "--set", "num_samples=2", "--data", _prompts(tmp_path),
                        "--judge", "demo-rule")
    assert again.stderr.count("already complete") == 2
    forced = run_molting("run", "--plugin", "sample-pairs", "--plugin", "dpo", "--max-steps", "2", "--output-dir",
                         str(out), "--eval", "off", "--set", "num_samples=2", "--data", _prompts(tmp_path), "--force",
                         "--judge", "demo-rule")
    assert forced.returncode == 0 and "already complete" not in forced.stderr


def _prompts(tmp_path):
    from molting import demo

    path = tmp_path / "prompts.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in demo.prompt_rows("train", 16)))
    return str(path)


def test_a_changed_setting_reruns_the_step_and_every_step_after_it(tmp_path):
    out = tmp_path / "out"
    host = load_plugins(disabled=[])
    base = {"max_steps": 1, "output_dir": str(out), "eval": "off", "num_samples": 2, "data": _prompts(tmp_path),
            "judges": {"demo-rule": 1.0}}
    config, steps = resolve_config(host, ["sample-pairs", "dpo"], flags=base)
    run(config, steps, host)
    first = (out / "2-dpo" / "model.safetensors").stat().st_mtime_ns
    config, steps = resolve_config(host, ["sample-pairs", "dpo"], flags={**base, "num_samples": 3})
    run(config, steps, host)
    assert record(out / "1-sample-pairs")["stage_params"]["num_samples"] == 3
    assert (out / "2-dpo" / "model.safetensors").stat().st_mtime_ns != first


def test_recipe_yaml_with_stages_runs_from_the_cli(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"),
        "eval": "off",
        "judges": ["demo-rule"],
        "stages": [{"plugin": "sample-pairs", "num_samples": 2, "data": _prompts(tmp_path)}, {"plugin": "ipo", "beta": 0.5}],
    }))
    result = run_molting("run", "--config", str(recipe), "--max-steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    ipo = record(tmp_path / "out" / "2-ipo")
    assert ipo["loss"] == "ipo" and ipo["loss_params"]["beta"] == 0.5 and ipo["config"]["max_steps"] == 1
    assert ipo["data"].startswith(str(tmp_path / "out" / "1-sample-pairs" / "data.jsonl"))
    rerun = yaml.safe_load((tmp_path / "out" / "2-ipo" / "recipe.yaml").read_text())  # reruns this step alone
    assert rerun["data"] == str(tmp_path / "out" / "1-sample-pairs" / "data.jsonl")
    assert rerun["model"] == ipo["model"] and rerun["output_dir"] == str(tmp_path / "out" / "2-ipo")


@pytest.mark.slow
def test_sft_then_on_policy_pairs_then_dpo_is_one_pipeline(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"),
        "eval": "off",
        "judges": {"demo-rule": 1.0},
        "stages": [
            {"plugin": "sft", "max_steps": 2},
            {"plugin": "sample-pairs", "num_samples": 4, "data": _prompts(tmp_path)},
            {"plugin": "dpo", "max_steps": 2},
        ],
    }))
    result = run_molting("run", "--config", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    pairs, dpo = record(out / "2-sample-pairs"), record(out / "3-dpo")
    assert pairs["model"] == dpo["model"] == str(out / "1-sft")  # sampled from, and trained on, the SFT model
    assert dpo["data"].startswith(str(out / "2-sample-pairs" / "data.jsonl"))
    rows = [json.loads(line) for line in (out / "2-sample-pairs" / "data.jsonl").read_text().splitlines()]
    assert len(rows) == pairs["metrics"]["pairs"] > 0
    assert pairs["metrics"]["pairs"] + pairs["metrics"]["skipped_ties"] == 16
    assert all(r["score_chosen"] > r["score_rejected"] and r["chosen"] != r["rejected"] for r in rows)
    assert f"wrote {len(rows)} pairs" in result.stderr


@pytest.mark.parametrize("key", ["model", "output_dir", "losses"])
def test_run_wide_keys_inside_a_stage_are_rejected(key):
    with pytest.raises(ConfigError, match=rf"item 2 \(dpo\) in recipe.yaml sets {key}, which apply to the whole run"):
        resolve_config(load_plugins(disabled=[]), [], {"stages": ["sft", {"plugin": "dpo", key: {"dpo": 1.0}}]},
                       recipe_source="recipe.yaml")


def test_the_run_wide_data_is_the_first_steps_and_a_steps_own_data_beats_it(tmp_path):
    from molting.pipeline import load_rows

    host = load_plugins(disabled=[])
    recipe = {"stages": ["sft", {"plugin": "reward-model"}, {"plugin": "dpo", "data": "demo-preference"}]}
    config, steps = resolve_config(host, [], recipe, flags={"data": "demo-sft"})
    assert [s.config.data for s in steps] == ["demo-sft", "demo-sft", "demo-preference"]
    # run() gives step 2 (same data as the run-wide flag) its stage default, demo-preference: checked end to end in
    # test_sft_then_on_policy_pairs_then_dpo_is_one_pipeline; here, the rule the loader applies
    rows, source = load_rows(host, steps[1], None)
    assert source.description == "dataset 'demo-preference' (train split)" and source.demo


def test_a_recipe_written_for_combined_losses_runs_again():
    host = load_plugins(disabled=[])
    config, [step] = resolve_config(host, [], flags={"losses": {"sft": 1.0, "dpo": 0.5}})
    assert step.stage.name == "preference"
    _, [again] = resolve_config(host, [], {"plugin": step.name, "losses": {"sft": 1.0, "dpo": 0.5}})
    assert again.stage.name == "preference" and again.loss.name == step.loss.name


def test_a_judge_weight_must_be_a_number():
    result = run_molting("run", "--plugin", "grpo", "--judge", "rule=heavy")
    assert result.returncode == 2 and "--judge" in result.stderr and "numeric weight" in result.stderr


@pytest.mark.slow
def test_a_lora_step_inside_a_pipeline_hands_on_its_merged_weights(tmp_path):
    out = tmp_path / "out"
    host = load_plugins(disabled=[])
    config, steps = resolve_config(host, ["sft", "dpo"], flags={
        "max_steps": 2, "output_dir": str(out), "eval": "off", "lora_r": 4, "learning_rate": 1e-2})
    run(config, steps, host)
    assert (out / "1-sft" / "model.safetensors").exists() and (out / "1-sft" / "adapter" / "adapter_config.json").exists()
    assert record(out / "2-dpo")["model"] == str(out / "1-sft")
    assert (out / "2-dpo" / "adapter_config.json").exists()  # the last step keeps its adapter


def test_an_edited_data_file_is_new_data_for_the_skip_check(tmp_path):
    out = tmp_path / "out"
    host = load_plugins(disabled=[])
    data = _prompts(tmp_path)
    flags = {"max_steps": 1, "output_dir": str(out), "eval": "off", "num_samples": 2, "data": data,
             "judges": {"demo-rule": 1.0}}
    config, steps = resolve_config(host, ["sample-pairs", "dpo"], flags=flags)
    run(config, steps, host)
    written = (out / "1-sample-pairs" / "data.jsonl").stat().st_mtime_ns
    from molting import demo

    with open(data, "a") as handle:
        handle.write(json.dumps(demo.prompt_rows("test", 1)[0]) + "\n")
    run(config, steps, host)
    assert (out / "1-sample-pairs" / "data.jsonl").stat().st_mtime_ns != written
