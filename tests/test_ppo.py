"""The ppo stage: its math against the formulas, and short real runs on the demo model."""

from __future__ import annotations

import json

import pytest
import torch

import molting
from molting.components import Judge
from molting.discovery import load_plugins
from molting.errors import JudgeError
from molting.advantages import gae, masked_whiten
from molting.plugins.ppo import METRICS, AdaptiveKL, PPOParams, ppo_losses
from molting.pipeline import run
from molting.resolve import resolve_config


def test_gae_is_the_discounted_sum_of_td_errors():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float)
    gamma, lam = 0.9, 0.8
    rewards = rewards * mask
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for b in range(3):
        n = int(mask[b].sum())
        v = values[b, :n].tolist() + [0.0]  # the value after the last token is 0
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            expected = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert advantages[b, t].item() == pytest.approx(expected, abs=1e-5)
            assert returns[b, t].item() == pytest.approx(expected + v[t], abs=1e-5)
        assert advantages[b, n:].abs().sum() == 0


def test_clipped_surrogate_and_value_loss_follow_the_paper():
    torch.manual_seed(1)
    shape = (4, 6)
    old = torch.randn(shape)
    new = old + 0.5 * torch.randn(shape)
    advantages, values, old_values, returns = (torch.randn(shape) for _ in range(4))
    mask = torch.ones(shape)
    mask[0, 4:] = 0
    params = PPOParams(cliprange=0.2, cliprange_value=0.1)
    policy_loss, value_loss, stats = ppo_losses(new, old, advantages, values, old_values, returns, mask, params)
    ratio = torch.exp(new - old)
    objective = torch.min(ratio * advantages, torch.clamp(ratio, 0.8, 1.2) * advantages)  # L^CLIP, maximised
    assert policy_loss.item() == pytest.approx(-(objective * mask).sum().item() / mask.sum().item(), abs=1e-6)
    clipped_values = old_values + torch.clamp(values - old_values, -0.1, 0.1)
    value_terms = torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    assert value_loss.item() == pytest.approx(0.5 * (value_terms * mask).sum().item() / mask.sum().item(), abs=1e-6)
    outside = ((ratio < 0.8) | (ratio > 1.2)) & (ratio * advantages > torch.clamp(ratio, 0.8, 1.2) * advantages)
    assert stats["policy/clipfrac_avg"].item() == pytest.approx((outside * mask).sum().item() / mask.sum().item(), abs=1e-6)
    # at ratio 1 the surrogate's gradient is the policy gradient: -advantage per token
    same = old.clone().requires_grad_()
    loss, _, _ = ppo_losses(same, old, advantages, values, old_values, returns, mask, params)
    loss.backward()
    assert torch.allclose(same.grad, -advantages * mask / mask.sum(), atol=1e-7)


def test_whitening_and_adaptive_kl():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    whitened = masked_whiten(values, mask)
    assert (whitened * mask).sum().item() == pytest.approx(0.0, abs=1e-6)
    assert whitened[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-5)  # unbiased variance 1
    controller = AdaptiveKL(0.1, target=6.0, horizon=100)
    controller.update(kl=12.0, n_steps=10)  # error clipped at +0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    controller.update(kl=6.0, n_steps=10)
    assert controller.value == pytest.approx(0.1 * 1.02)


def test_params_reject_bad_values():
    with pytest.raises(ValueError):
        PPOParams(num_ppo_epochs=0)
    with pytest.raises(ValueError):
        PPOParams(cliprange=0)
    from molting.plugins.advantages import GAEParams

    with pytest.raises(ValueError):
        GAEParams(lam=1.5)


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    host = load_plugins(disabled=[])
    out = tmp_path_factory.mktemp("ppo") / "out"
    config, steps = resolve_config(host, ["ppo"], flags={
        "judges": {"demo-rule": 1.0}, "max_steps": 3, "logging_steps": 1, "output_dir": str(out), "eval": "off",
        "batch_size": 4, "num_mini_batches": 2, "num_ppo_epochs": 2,
    })
    [metrics] = run(config, steps, host)
    return out, metrics


def test_a_short_ppo_run_logs_the_metrics_and_saves_a_causal_lm(ppo_run, demo_model):
    from transformers import AutoModelForCausalLM

    out, metrics = ppo_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for name in METRICS:
        assert all(name in r for r in records), name
    assert all(0.0 <= r["objective/scores"] <= 1.0 for r in records)
    assert records[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout's policy is the reference
    trained = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(demo_model)
    changed = [not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters())]
    assert any(changed)
    assert json.loads((out / "molting_run.json").read_text())["status"] == "completed"


class RaisingJudge:
    @molting.hookimpl
    def molting_register_judges(self, register):
        def score(prompts, completions, params):
            return [float("nan")] * len(prompts)

        register(Judge(name="nan-judge", score=score, description="Returns NaN."))


def test_a_judge_returning_nan_stops_ppo_with_its_name(tmp_path):
    host = load_plugins(disabled=[])
    host.register(RaisingJudge(), "raising")
    config, steps = resolve_config(host, ["ppo"], flags={
        "judges": {"nan-judge": 1.0}, "max_steps": 1, "output_dir": str(tmp_path / "out"), "eval": "off", "batch_size": 2,
    })
    with pytest.raises(JudgeError, match=r"judge 'nan-judge' returned nan for the prompt at data row \d+"):
        run(config, steps, host)
    record = json.loads((tmp_path / "out" / "molting_run.json").read_text())
    assert record["status"] == "failed" and "nan-judge" in record["error"]


def test_ppo_with_lora_uses_the_base_model_as_reference(tmp_path):
    host = load_plugins(disabled=[])
    config, steps = resolve_config(host, ["ppo"], flags={
        "judges": {"demo-rule": 1.0}, "max_steps": 2, "output_dir": str(tmp_path / "out"), "eval": "off",
        "batch_size": 2, "lora_r": 4,
    })
    run(config, steps, host)
    assert (tmp_path / "out" / "adapter_config.json").exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_the_reward_model_judge_needs_a_model_when_the_run_trained_none(tmp_path):
    host = load_plugins(disabled=[])
    if "reward-model" not in host.components["judge"]:
        pytest.skip("the reward-model judge is not installed")
    config, steps = resolve_config(host, ["ppo"], flags={"max_steps": 1, "output_dir": str(tmp_path / "out")})
    with pytest.raises(molting.MoltingError, match="reward-model"):
        run(config, steps, host)
