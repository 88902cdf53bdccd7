"""The grpo stage: trl's batching, advantages and metrics, the whole-model loss against trl's, judges' errors, the demo."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import molting
from molting.components import Judge
from molting.plugins.grpo import GRPOParams
from molting.plugins.grpo.trainer import GRPOTrainer
from molting.plugins.grpo_losses import GRPOLossParams

STATIC_METRICS = ("loss", "reward", "reward_std", "frac_reward_zero_std", "entropy", "clip_ratio/low_mean",
                  "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length",
                  "completions/min_length", "completions/max_length", "completions/clipped_ratio")


def write_prompts(tmp_path: Path, n: int = 8, rows: list | None = None) -> Path:
    from molting.demo import prompt_rows

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (rows or prompt_rows("train", n))))
    return path


def run_stage(tmp_path: Path, plugin: str = "grpo", host=None, rows: list | None = None, **settings):
    """A short run on prompt rows from a file (no demo defaults, no evaluation); returns metrics.jsonl's records."""
    from molting.demo import demo_model_dir
    from molting.discovery import load_plugins
    from molting.pipeline import run
    from molting.resolve import resolve_config

    host = host or load_plugins()
    flags = {"model": str(demo_model_dir()), "data": str(write_prompts(tmp_path, rows=rows)),
             "output_dir": str(tmp_path / "run"), "batch_size": 8, "max_steps": 2, "logging_steps": 1,
             "learning_rate": 1e-4, "num_generations": 4, "max_new_tokens": 20, "eval": "off", **settings}
    config, steps = resolve_config(host, [plugin], flags=flags)
    run(config, steps, host)
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- settings


def test_params_validate():
    GRPOParams()
    for bad in (dict(num_generations=1), dict(num_generations=2.5), dict(top_entropy_quantile=0), dict(top_p=0.0),
                dict(temperature=0), dict(num_iterations=0), dict(beta=-1.0), dict(max_new_tokens=float("nan"))):
        with pytest.raises((ValueError, TypeError)):
            GRPOParams(**bad)


def test_the_stage_is_registered_with_trl_like_defaults():
    from molting.discovery import load_plugins

    stage = load_plugins().get("stage", "grpo")
    assert (stage.default_loss, stage.default_data, stage.produces) == ("grpo", "demo-prompts", "policy")
    assert dict(stage.default_judges) == {"rule": 1.0}
    assert set(STATIC_METRICS) <= set(stage.metrics)


def test_a_batch_that_does_not_hold_whole_groups_is_a_config_error(tmp_path):
    with pytest.raises(molting.ConfigError, match="multiple of num_generations"):
        run_stage(tmp_path, batch_size=6)


def test_checkpoints_inside_a_generation_batch_s_iterations_are_refused(tmp_path):
    with pytest.raises(molting.ConfigError, match=r"--save-steps \(3\) must be a multiple of num_iterations \(2\)"):
        run_stage(tmp_path, save_steps=3, num_iterations=2)


# --------------------------------------------------------------------------- runs


def test_two_steps_log_trl_metrics_without_a_reference(tmp_path, capsys):
    records = run_stage(tmp_path)
    logged = set().union(*records)
    assert set(STATIC_METRICS) | {"rewards/rule/mean", "rewards/rule/std"} <= logged
    assert "kl" not in logged
    assert "reference model: none" in capsys.readouterr().err
    assert all(r["completions/max_length"] <= 20 for r in records if "completions/max_length" in r)
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_beta_loads_a_reference_and_logs_kl(tmp_path, capsys):
    records = run_stage(tmp_path, plugin="dapo", beta=0.05, judges={"rule": 1.0, "demo-rule": 0.5})
    assert "reference model: frozen copy" in capsys.readouterr().err
    kl = [r["kl"] for r in records if "kl" in r]
    assert kl and kl[0] == pytest.approx(0.0, abs=1e-6) and all(k >= 0 for k in kl)  # the policy starts as the reference
    assert {"rewards/rule/mean", "rewards/demo-rule/mean"} <= set().union(*records)


def test_lora_uses_the_adapter_free_model_as_reference(tmp_path, capsys):
    records = run_stage(tmp_path, beta=0.05, lora_r=4)
    assert "adapter disabled" in capsys.readouterr().err
    assert any("kl" in r for r in records)


@pytest.mark.parametrize("iterations", [1, 2])
def test_each_generation_batch_is_sampled_once_and_reused_for_num_iterations(tmp_path, monkeypatch, iterations):
    original = GRPOTrainer.generate_and_score
    calls = []

    def counting(self, items):
        batch = original(self, items)
        calls.append(("old_logps" in batch, len(items)))
        return batch

    monkeypatch.setattr(GRPOTrainer, "generate_and_score", counting)
    records = run_stage(tmp_path, max_steps=4, num_iterations=iterations, gradient_accumulation_steps=2)
    # each optimizer step takes 2 micro-batches of 8 completions: one generation batch of 16 = 4 prompts x 4
    assert calls == [(iterations > 1, 16)] * (4 // iterations)
    if iterations > 1:  # the second pass over a batch sees a policy that moved: ratios differ from 1
        assert any(r.get("clip_ratio/region_mean", 0) > 0 or r["loss"] != 0 for r in records if "loss" in r)


def test_masked_truncated_completions_leave_the_loss_at_zero(tmp_path):
    records = run_stage(tmp_path, max_new_tokens=3, max_steps=1, mask_truncated_completions=True)
    first = records[0]
    assert first["completions/clipped_ratio"] == 1.0 and first["completions/max_length"] == 3
    assert first["loss"] == 0.0 and first["grad_norm"] == 0.0


def test_checkpoints_resume_where_the_run_stopped(tmp_path):
    run_stage(tmp_path, max_steps=2, save_steps=2)
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    records = run_stage(tmp_path, max_steps=4, save_steps=2, resume="auto")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


class NaNLoss:
    """A loss of the grpo stage whose value is NaN: the non-finite guard must skip its steps, then stop."""

    @molting.hookimpl
    def molting_register_losses(self, register):
        from molting.components import Loss, LossOutput

        def compute(inputs, params):
            return LossOutput(losses=(inputs.logps * inputs.mask).sum(dim=1) * float("nan"))

        register(Loss(name="nan-grpo", compute=compute, description="NaN on purpose.", stage="grpo",
                      needs_reference=False))


def test_non_finite_steps_are_skipped_then_the_run_stops_naming_the_prompts(tmp_path, capsys):
    from molting.discovery import load_plugins

    host = load_plugins()
    host.register(NaNLoss(), "nan-loss")
    with pytest.raises(molting.MoltingError, match="non-finite"):
        run_stage(tmp_path, plugin="nan-grpo", host=host, max_steps=4, max_skipped_steps=2)
    assert "optimizer step skipped (1 in a row" in capsys.readouterr().err


class Faulty:
    """A plugin with judges that fail on the prompt whose reference answer is 'boom'."""

    @molting.hookimpl
    def molting_register_judges(self, register):
        def raises(prompts, completions, params, answer, **columns):
            if "boom" in answer:
                raise RuntimeError("cannot grade this one")
            return [1.0] * len(prompts)

        def nan(prompts, completions, params, answer, **columns):
            return [float("nan") if a == "boom" else 0.0 for a in answer]

        def short(prompts, completions, params, **columns):
            return [0.0] * (len(prompts) - 1)

        for name, score in (("raises", raises), ("nan", nan), ("short", short)):
            register(Judge(name=name, score=score, description=f"A judge that fails: {name}."))


@pytest.mark.parametrize("judge, phrase", [("raises", "raised RuntimeError"), ("nan", "returned nan"),
                                           ("short", "scores for")])
def test_a_failing_judge_is_a_judge_error_naming_it_and_the_prompt(tmp_path, judge, phrase):
    from molting.demo import prompt_rows
    from molting.discovery import load_plugins

    host = load_plugins()
    host.register(Faulty(), "faulty")
    rows = prompt_rows("train", 4)
    rows[2] = {**rows[2], "answer": "boom"}
    with pytest.raises(molting.JudgeError) as error:
        run_stage(tmp_path, host=host, rows=rows, judges={judge: 1.0}, max_steps=2)
    message = str(error.value)
    assert f"judge {judge!r}" in message and phrase in message
    if judge == "short":  # one score short of the distinct completions it was given (the cache drops repeats)
        import re

        given, wanted = map(int, re.search(r"returned (\d+) scores for (\d+) completions", message).groups())
        assert given == wanted - 1
    if judge != "short":
        assert "data row 2" in message


# --------------------------------------------------------------------------- pieces against trl


def make_trainer(tmp_path, loss_name="grpo", loss_params=None, grpo=None, ref_model=None, scorer=None,
                 advantage_params=None):
    from trl.trainer.utils import identity

    from molting.config import RunConfig
    from molting.demo import demo_model_dir, prompt_rows
    from molting.discovery import load_plugins
    from molting.models import load_causal_lm
    from molting.training import training_arguments

    model, tokenizer = load_causal_lm(demo_model_dir())
    args = training_arguments(RunConfig(plugins=["grpo"], batch_size=8), tmp_path / "ours")
    rows = [{"index": i, "row": r} for i, r in enumerate(prompt_rows("train", 8))]
    trainer = GRPOTrainer(
        model=model, args=args, train_dataset=rows, data_collator=identity, processing_class=tokenizer,
        loss=load_plugins().get("loss", loss_name), loss_params=loss_params or GRPOLossParams(),
        ref_model=ref_model, grpo=grpo or GRPOParams(num_generations=4, max_new_tokens=20), scorer=scorer,
        advantage=load_plugins().get("advantage", "grpo"), advantage_params=advantage_params,
    )
    return trainer, model, tokenizer


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_are_trls(tmp_path, scale):
    totals = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 1.0, 1.0]

    def scorer(prompts, completions, columns, rows):
        assert columns["answer"] and list(rows) == list(range(12))
        return totals, {"a": totals}

    scorer.metrics = dict  # a Scorer's counters (Scorer.metrics): none here
    from molting.plugins.advantages import GRPOAdvantageParams

    trainer, _, _ = make_trainer(tmp_path, grpo=GRPOParams(num_generations=4), scorer=scorer,
                                 advantage_params=GRPOAdvantageParams(scale_rewards=scale))
    rows = [{"prompt": "p", "answer": "1"}] * 12
    trainer.model.train()  # metrics are filed under the mode, as in a training step
    from molting.sampling import Samples

    completions = Samples(prompts=["p"] * 12, rows=list(range(12)), texts=["c"] * 12, prompt_ids=None, prompt_mask=None,
                          completion_ids=None, completion_mask=None, truncated=None)
    advantages = trainer.advantages(completions, rows, list(range(12)))
    rewards = torch.tensor(totals)
    grouped = rewards.view(-1, 4)
    # trl's sum_then_normalize, written out
    expected = rewards - grouped.mean(1).repeat_interleave(4)
    std = rewards.std().expand(12) if scale == "batch" else grouped.std(1).repeat_interleave(4)
    if scale != "none":
        expected = expected / (std + 1e-4)
    torch.testing.assert_close(advantages, expected)
    recorded = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert recorded["frac_reward_zero_std"] == pytest.approx(1 / 3 if scale != "batch" else 0.0)
    assert recorded["reward"] == pytest.approx(rewards.mean().item())
    assert recorded["rewards/a/std"] == pytest.approx(rewards.std().item())


@pytest.mark.parametrize("loss_name", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_whole_model_loss_and_gradient_equal_trls_grpo_trainer(tmp_path, loss_name):
    """Same weights, same sampled batch: molting's compute_loss and trl's GRPOTrainer._compute_loss agree."""
    _whole_model_agrees(tmp_path, loss_name, GRPOLossParams(beta=0.04, epsilon_high=0.28),
                        dict(loss_type=loss_name, epsilon_high=0.28))


@pytest.mark.parametrize(("loss_name", "settings", "trl_settings"), [
    ("gspo", dict(epsilon=0.05, epsilon_high=0.1), dict(loss_type="grpo", importance_sampling_level="sequence",
                                                       epsilon=0.05, epsilon_high=0.1)),
    ("cispo", dict(epsilon_high=1.5), dict(loss_type="cispo", epsilon_high=1.5)),
    ("sapo", dict(temperature_pos=0.8, temperature_neg=1.2), dict(loss_type="sapo", sapo_temperature_pos=0.8,
                                                                  sapo_temperature_neg=1.2)),
    ("dapo", dict(epsilon_high=0.28), dict(loss_type="dapo", epsilon_high=0.28, top_entropy_quantile=0.3)),
    ("cispo", dict(), dict(loss_type="cispo", epsilon_high=5.0, top_entropy_quantile=0.5)),
], ids=["gspo", "cispo", "sapo", "dapo-entropy-mask", "cispo-entropy-mask"])
def test_whole_model_new_losses_and_the_entropy_mask_equal_trls(tmp_path, loss_name, settings, trl_settings):
    from molting.discovery import load_plugins

    params = load_plugins().get("loss", loss_name).params(beta=0.04, **settings)
    _whole_model_agrees(tmp_path, loss_name, params, trl_settings,
                        quantile=trl_settings.get("top_entropy_quantile", 1.0))


def _whole_model_agrees(tmp_path, loss_name, loss_params, trl_settings, quantile=1.0):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from molting.demo import prompt_rows
    from molting.logps import completion_token_logps
    from molting.sampling import sample

    beta, temperature = 0.04, 0.7
    trainer, model, tokenizer = make_trainer(
        tmp_path, loss_name, loss_params,
        GRPOParams(num_generations=4, max_new_tokens=20, temperature=temperature, beta=beta,
                   top_entropy_quantile=quantile),
    )
    trl_model = copy.deepcopy(model)
    config = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, num_generations=4,
                        max_completion_length=20, beta=beta, temperature=temperature, use_cpu=True, bf16=False,
                        report_to=[], **trl_settings)
    prompts = [r["prompt"] for r in prompt_rows("train", 2)]
    theirs = GRPOTrainer(model=trl_model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=config,
                         train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tokenizer)
    torch.manual_seed(0)
    s = sample(model, tokenizer, prompts, n=4, max_new_tokens=20, temperature=temperature)
    with torch.no_grad():
        logps, _ = completion_token_logps(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask,
                                          temperature=temperature)
    g = torch.Generator().manual_seed(1)
    old = logps + 0.3 * torch.randn(logps.shape, generator=g)  # as on a later iteration: ratios away from 1
    ref = logps + 0.3 * torch.randn(logps.shape, generator=g)
    advantages = torch.randn(8, generator=g)
    batch = {"prompt_ids": s.prompt_ids, "prompt_mask": s.prompt_mask, "completion_ids": s.completion_ids,
             "completion_mask": s.completion_mask, "advantages": advantages, "num_items_in_batch": s.completion_mask.sum()}
    model.train()
    trainer.model.train()
    ours = trainer.compute_loss(model, {**batch, "old_logps": old, "ref_logps": ref})
    ours.backward()
    theirs.model.train()
    theirs.current_gradient_accumulation_steps = 1
    trl_loss = theirs._compute_loss(theirs.model, {**batch, "old_per_token_logps": old, "ref_per_token_logps": ref})
    trl_loss.backward()
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    for (name, p), q in zip(model.named_parameters(), theirs.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    ours_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trl_metrics = {k: v[-1] for k, v in theirs._metrics["train"].items()}
    for name in ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                 "cispo_clip_ratio"):
        if name in trl_metrics:
            assert ours_metrics[name] == pytest.approx(trl_metrics[name], abs=1e-5), name


@pytest.mark.parametrize(("plugin", "settings"), [("gspo", {}), ("cispo", {}), ("sapo", {}),
                                                   ("grpo", {"top_entropy_quantile": 0.2})])
def test_the_new_losses_and_the_entropy_mask_train_in_the_stage(tmp_path, plugin, settings):
    records = run_stage(tmp_path, plugin=plugin, learning_rate=3e-4, **settings)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    logged = json.loads((tmp_path / "run" / "molting_run.json").read_text())
    assert logged["loss"] == plugin
    if settings:
        assert logged["stage_params"]["top_entropy_quantile"] == 0.2
    if plugin == "cispo":
        assert "cispo_clip_ratio" in set().union(*records)


# --------------------------------------------------------------------------- the measured effect


@pytest.mark.slow
def test_the_demo_run_raises_held_out_greedy_accuracy(tmp_path):
    """`molting run --plugin grpo` (the demo settings: rule judge, 120 steps, seed 42) answers more held-out sums
    right, greedily, than the starting model, on the 256 held-out problems (20-35 s of training): 0.535 -> 0.609
    in fp32 with transformers 5.25 / trl 1.16 and per-completion random streams (seeds 0, 1, 2: 0.562, 0.570,
    0.582 when measured at 0.590); 0.578 before those streams, 0.633 on the stack of 2026-12-01. Pinned to fp32:
    with `--precision auto` a CPU with avx512_bf16 trains under bf16 autocast, a trajectory of its own (0.535 ->
    0.543 at seed 42 on such a machine), and the test would depend on the machine CI draws."""
    from molting.demo import demo_model_dir, prompt_rows
    from molting.discovery import load_plugins
    from molting.evaluation import generate, task_metrics
    from molting.models import load_causal_lm
    from molting.pipeline import run
    from molting.resolve import resolve_config

    host = load_plugins()
    config, steps = resolve_config(host, ["grpo"], flags={"output_dir": str(tmp_path / "run"), "eval": "off",
                                                           "logging_steps": 20, "precision": "fp32"})
    assert (config.max_steps, config.learning_rate, config.seed) == (120, 5e-5, 42)
    run(config, steps, host)
    prompts = [r["prompt"] for r in prompt_rows("test")]

    def accuracy(path):
        model, tokenizer = load_causal_lm(path)
        return task_metrics(prompts, generate(model.eval(), tokenizer, prompts, temperature=0))["correct"]

    before, after = accuracy(demo_model_dir()), accuracy(tmp_path / "run")
    assert after > before + 0.02, (before, after)


def test_overlong_prompts_are_dropped_and_the_others_keep_their_row_numbers(tmp_path, capsys):
    from molting.demo import prompt_rows
    from molting.discovery import load_plugins

    host = load_plugins()
    host.register(Faulty(), "faulty")
    rows = prompt_rows("train", 8)
    for i in range(4):
        rows[i] = {**rows[i], "prompt": "Some background first. " * 6 + rows[i]["prompt"]}
    rows[5] = {**rows[5], "answer": "boom"}
    with pytest.raises(molting.JudgeError, match="data row 5"):
        run_stage(tmp_path, host=host, rows=rows, judges={"raises": 1.0}, max_length=40, overlong="drop")
    assert "4 of 8 prompts (e.g. row 0) are longer than max_length - max_new_tokens = 20 tokens: dropped" in (
        capsys.readouterr().err)


def test_overlong_prompts_are_cut_to_their_end(tmp_path, capsys):
    records = run_stage(tmp_path, max_length=30, max_steps=1)  # the demo prompts have 15 tokens: 10 are kept
    assert "8 of 8 prompts (e.g. row 0) are longer than max_length - max_new_tokens = 10 tokens: cut to their last 10" in (
        capsys.readouterr().err)
    assert records[0]["completions/mean_length"] > 0
