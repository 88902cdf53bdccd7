"""Advantage estimators: each against its formula as trl / verl write it, the registry and `--advantage` in runs,
and broken estimators failing the conformance check that names their fault."""

from __future__ import annotations

import re
import json

import pytest
import torch

import molting
from molting import Advantage, AdvantageInputs, AdvantageOutput
from molting.advantages import masked_whiten
from molting.discovery import load_plugins
from molting.testing import check_plugin

from test_grpo import run_stage

HOST = load_plugins()


def estimate(name: str, inputs: AdvantageInputs, **settings) -> AdvantageOutput:
    advantage = HOST.get("advantage", name)
    return advantage.compute(inputs, advantage.params(**settings))


def batch(seed: int = 0, prompts: int = 3, g: int = 4, width: int = 7):
    gen = torch.Generator().manual_seed(seed)
    n = prompts * g
    lengths = torch.randint(1, width + 1, (n,), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    rewards = torch.randn(n, generator=gen)
    kl = 0.3 * torch.randn(n, width, generator=gen) * mask
    return AdvantageInputs(rewards=rewards, groups=torch.arange(n) // g, mask=mask, kl=kl), g


# --------------------------------------------------------------------------- the formulas


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_rloo_is_trls_leave_one_out(kl_coef, normalize):
    inputs, g = batch(1)
    out = estimate("rloo", inputs, kl_coef=kl_coef, normalize_advantages=normalize)
    # trl 1.16's RLOOTrainer, written out: sequence KL off the reward, (sum - r) / (G - 1) baseline
    rewards = inputs.rewards - kl_coef * (inputs.kl * inputs.mask).sum(-1)
    grouped = rewards.view(-1, g)
    baselines = ((grouped.sum(1, keepdim=True) - grouped) / (g - 1)).view(-1)
    expected = rewards - baselines
    if normalize:
        expected = (expected - expected.mean()) / (expected.std() + 1e-4)
    torch.testing.assert_close(out.advantages, expected)


@pytest.mark.parametrize("group_baseline", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_is_verls_whitened_return_to_go(gamma, group_baseline):
    inputs, g = batch(2)
    kl_coef = 0.01
    out = estimate("reinforce++", inputs, kl_coef=kl_coef, gamma=gamma, group_baseline=group_baseline)
    rewards = inputs.rewards
    if group_baseline:
        rewards = rewards - rewards.view(-1, g).mean(1).repeat_interleave(g)
    token_rewards = -kl_coef * inputs.kl * inputs.mask
    last = inputs.mask.sum(1).long() - 1
    token_rewards[torch.arange(len(last)), last] += rewards
    # verl's compute_reinforce_plus_plus_outcome_advantage, written out
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros(len(last))
    for t in reversed(range(token_rewards.shape[1])):
        running = token_rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * inputs.mask[:, t]
    expected = masked_whiten(returns, inputs.mask) * inputs.mask
    torch.testing.assert_close(out.advantages, expected, atol=1e-5, rtol=1e-5)
    assert out.advantages.shape == inputs.mask.shape


def test_remax_subtracts_the_greedy_reward():
    inputs, _ = batch(3)
    baselines = torch.randn(inputs.rewards.numel())
    out = estimate("remax", AdvantageInputs(rewards=inputs.rewards, groups=inputs.groups, mask=inputs.mask,
                                            baselines=baselines))
    torch.testing.assert_close(out.advantages, inputs.rewards - baselines)


def test_gae_is_whitened_and_returns_are_advantages_plus_values():
    from molting.advantages import gae

    inputs, _ = batch(4)
    values = torch.randn(inputs.mask.shape) * inputs.mask
    token_rewards = torch.randn(inputs.mask.shape) * inputs.mask
    out = estimate("gae", AdvantageInputs(rewards=inputs.rewards, groups=torch.arange(12), mask=inputs.mask,
                                          values=values, token_rewards=token_rewards), gamma=0.9, lam=0.8)
    raw, returns = gae(token_rewards, values, inputs.mask, 0.9, 0.8)
    torch.testing.assert_close(out.returns, returns)
    torch.testing.assert_close(out.advantages, masked_whiten(raw, inputs.mask) * inputs.mask)


def test_groups_need_not_be_contiguous():
    """Group statistics follow the ids, not the row order: a shuffled batch gets the same advantages."""
    inputs, _ = batch(5)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    shuffled = AdvantageInputs(rewards=inputs.rewards[order], groups=inputs.groups[order], mask=inputs.mask[order])
    for name in ("grpo", "rloo"):
        torch.testing.assert_close(estimate(name, shuffled).advantages, estimate(name, inputs).advantages[order])


# --------------------------------------------------------------------------- the registry and the runs


def test_the_estimators_are_registered_with_their_needs():
    advantages = {name: HOST.get("advantage", name) for name in ("grpo", "rloo", "reinforce++", "remax", "gae")}
    assert advantages["gae"].stages == ("ppo",) and set(advantages["gae"].needs) == {"values", "token_rewards"}
    assert advantages["remax"].requirements(advantages["remax"].params()) == ("greedy",)
    pp = advantages["reinforce++"]
    assert pp.requirements(pp.params()) == ("reference",) and pp.requirements(pp.params(kl_coef=0)) == ()
    assert HOST.get("stage", "grpo").default_advantage == "grpo"
    assert HOST.get("stage", "ppo").default_advantage == "gae"


@pytest.mark.parametrize("name", ["rloo", "reinforce++", "remax"])
def test_grpo_trains_with_each_estimator_and_records_it(tmp_path, capsys, name):
    records = run_stage(tmp_path, advantage=name)
    logged = json.loads((tmp_path / "run" / "molting_run.json").read_text())
    assert logged["advantage"] == name and logged["config"]["advantage"] == name
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    err = capsys.readouterr().err
    assert f"advantages {name}" in err
    if name == "reinforce++":  # its KL in the reward needs the reference: loaded though beta is 0
        assert "reference model: frozen copy" in err and logged["advantage_params"]["kl_coef"] == 0.01
    if name == "remax":
        assert "baseline_reward" in set().union(*records)


def test_an_estimators_settings_are_set_like_any_hyperparameter(tmp_path):
    run_stage(tmp_path, advantage="rloo", normalize_advantages=True)
    logged = json.loads((tmp_path / "run" / "molting_run.json").read_text())
    assert logged["advantage_params"] == {"kl_coef": 0.0, "normalize_advantages": True}


def test_a_setting_of_another_estimator_is_an_unknown_key(tmp_path):
    with pytest.raises(molting.ConfigError, match="unknown config key 'scale_rewards'"):
        run_stage(tmp_path, advantage="rloo", scale_rewards="batch")


@pytest.mark.parametrize(("plugin", "name", "message"), [
    ("grpo", "gae", "advantage 'gae' runs in ppo, not in stage 'grpo'"),
    ("ppo", "rloo", "advantage 'rloo' runs in grpo, not in stage 'ppo'"),
    ("dpo", "rloo", "no stage of this run (preference) takes an advantage estimator"),
])
def test_an_estimator_its_stage_cannot_feed_is_refused(plugin, name, message):
    from molting.resolve import resolve_config

    with pytest.raises(molting.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_config(HOST, [plugin], flags={"advantage": name})


def test_an_unknown_estimator_lists_the_available_ones():
    from molting.resolve import resolve_config

    with pytest.raises(molting.PluginError, match=r"no advantage named 'vtrace'.*Available advantages: gae"):
        resolve_config(HOST, ["grpo"], flags={"advantage": "vtrace"})


def test_the_cli_takes_advantage_and_plugins_lists_them(tmp_path):
    from conftest import run_molting

    listing = run_molting("plugins")
    assert re.search(r"advantage +reinforce\+\+", listing.stdout)
    assert "--advantage NAME" in run_molting("run", "--help").stdout


# --------------------------------------------------------------------------- broken estimators fail the checks


def _broken(name, compute, needs=()):
    return Advantage(name=name, compute=compute, description="A deliberately broken estimator.", needs=needs)


BROKEN = {
    "scalar": (lambda i, p: AdvantageOutput(i.rewards.mean()), "advantage-shapes", "expected (12,)"),
    "padding": (lambda i, p: AdvantageOutput(torch.ones_like(i.mask)), "advantage-shapes", "not zero on the padding"),
    "reversed": (lambda i, p: AdvantageOutput(-(i.rewards - i.rewards.mean())), "advantage-order",
                 "a better completion ranks lower"),
    "undeclared": (lambda i, p: AdvantageOutput(i.rewards - i.baselines), "advantage-shapes",
                   "declare what compute reads in Advantage.needs"),
    "in-place": (lambda i, p: AdvantageOutput(i.rewards.sub_(i.rewards.mean())), "advantage-deterministic",
                 "changed its inputs in place: rewards"),
    "by-position": (lambda i, p: AdvantageOutput(i.rewards - torch.arange(len(i.rewards)) * 0.1),
                    "advantage-permutation", "once the batch was shuffled"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_estimator_fails_the_named_check(name):
    compute, failing, phrase = BROKEN[name]
    results = {r.check: r for r in check_plugin(_broken(name, compute), skip_slow=True)}
    assert results[failing].status == "failed", results[failing]
    assert phrase in results[failing].message


def test_gae_and_returns_step_over_an_episodes_environment_tokens():
    """An episode's mask has gaps where the environment wrote: GAE and the return-to-go over it equal those of the
    model's tokens laid side by side (as verl's multi-turn GAE), and a mask without gaps is the usual recursion."""
    from molting.advantages import discounted_returns, gae, last_positions, last_token_rewards

    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0], [1, 0, 0, 1, 1, 0, 0, 0]], dtype=torch.float32)
    rewards = torch.randn(2, 8, generator=generator) * mask
    values = torch.randn(2, 8, generator=generator)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    discounted = discounted_returns(rewards, mask, gamma=0.9)
    for row in range(2):
        kept = mask[row].bool()
        packed = gae(rewards[row][kept][None], values[row][kept][None], torch.ones(1, int(kept.sum())), 0.9, 0.8)
        torch.testing.assert_close(advantages[row][kept], packed[0][0])
        torch.testing.assert_close(returns[row][kept], packed[1][0])
        torch.testing.assert_close(discounted[row][kept],
                                   discounted_returns(rewards[row][kept][None], torch.ones(1, int(kept.sum())), 0.9)[0])
        assert (advantages[row][~kept] == 0).all()
    assert last_positions(mask).tolist() == [6, 4]
    assert last_token_rewards(torch.tensor([2.0, 3.0]), mask)[[0, 1], [6, 4]].tolist() == [2.0, 3.0]
