"""The built-in advantage estimators: grpo, rloo, reinforce++, remax (for ``grpo``) and gae (for ``ppo``).

With r_i the reward of completion i, g(i) its group (the G completions of
one prompt) and the mean, std and size n taken over the group:

    grpo         A_i = (r_i − mean_g) / (std_g + 1e-4)        scale_rewards: group | batch (the batch's std) | none
                                                             (DeepSeekMath, arXiv:2402.03300; trl's GRPOTrainer)
    rloo         A_i = r_i − (Σ_g r − r_i) / (n − 1)           leave-one-out baseline (Ahmadian et al., arXiv:2402.14740;
                                                             trl's RLOOTrainer: kl_coef·Σ_t KL_t off the reward first,
                                                             normalize_advantages: then whitened over the batch)
    reinforce++  A_it = whiten_batch(Σ_{s≥t} γ^(s−t)·r_is)     r_is = −kl_coef·KL_is, plus r_i on the last token; the
                                                             return-to-go whitened over the batch's tokens (Hu,
                                                             arXiv:2501.03262; verl and OpenRLHF). group_baseline:
                                                             r_i − mean_g first (REINFORCE++-baseline)
    remax        A_i = r_i − r(greedy completion of i's prompt)  (Li et al., arXiv:2310.10505)
    gae          A_it = Σ_l (γλ)^l·δ_i,t+l, δ_it = r_it + γ·V_i,t+1 − V_it, whitened over the batch; returns A + V
                                                             (Schulman et al., arXiv:1506.02438; trl's PPOTrainer)

KL_it is log π_old − log π_ref (k1) per token, the stage's; ``gae`` reads the
stage's shaped token rewards (PPO puts −kl_coef·KL on every token and the
score on the last one).
"""

from __future__ import annotations

from typing import Any

import attrs

import molting
from molting.advantages import discounted_returns, gae, group_stats, last_token_rewards, masked_whiten
from molting.components import Advantage, AdvantageInputs, AdvantageOutput


def _unit(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1):
        raise ValueError(f"{attribute.name} must be a number in [0, 1], got {value!r}")


@attrs.frozen
class GRPOAdvantageParams:
    scale_rewards: str = attrs.field(default="group", validator=attrs.validators.in_(("group", "batch", "none")))
    """Divide by the group's reward std, the whole batch's, or nothing (Dr. GRPO)."""


def grpo_advantages(inputs: AdvantageInputs, params: GRPOAdvantageParams) -> AdvantageOutput:
    import torch

    rewards = inputs.rewards
    means, stds, _ = group_stats(rewards, inputs.groups)
    if params.scale_rewards == "batch":
        stds = rewards.std().expand_as(rewards)
    advantages = rewards - means
    if params.scale_rewards != "none":
        advantages = advantages / (stds + 1e-4)
    zero = torch.isclose(stds, torch.zeros_like(stds)).float().mean()
    return AdvantageOutput(advantages, metrics={"frac_reward_zero_std": zero})


@attrs.frozen
class RLOOParams:
    kl_coef: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    """Subtract kl_coef·Σ_t KL_t (to the reference) from each reward first, as trl's RLOO does with beta; > 0 loads
    the reference."""
    normalize_advantages: bool = False
    """Whiten the advantages over the batch (trl's normalize_advantages)."""


def rloo_advantages(inputs: AdvantageInputs, params: RLOOParams) -> AdvantageOutput:
    rewards = inputs.rewards
    if params.kl_coef:
        rewards = rewards - params.kl_coef * (inputs.kl * inputs.mask).sum(dim=1)
    means, _, counts = group_stats(rewards, inputs.groups)
    advantages = (rewards - means) * counts / (counts - 1).clamp(min=1)  # = r_i − mean of the others
    if params.normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
    return AdvantageOutput(advantages)


@attrs.frozen
class ReinforcePPParams:
    kl_coef: float = attrs.field(default=0.01, validator=attrs.validators.ge(0))
    """The token-level KL penalty in the reward (OpenRLHF's init_kl_coef); > 0 loads the reference."""
    gamma: float = attrs.field(default=1.0, validator=_unit)
    """Discount of the return-to-go."""
    group_baseline: bool = False
    """Subtract the group's mean reward first (REINFORCE++-baseline, for G > 1 samples per prompt)."""


def reinforce_pp_advantages(inputs: AdvantageInputs, params: ReinforcePPParams) -> AdvantageOutput:
    rewards = inputs.rewards
    if params.group_baseline:
        rewards = rewards - group_stats(rewards, inputs.groups)[0]
    token_rewards = last_token_rewards(rewards, inputs.mask)
    if params.kl_coef:
        token_rewards = token_rewards - params.kl_coef * inputs.kl * inputs.mask
    returns = discounted_returns(token_rewards, inputs.mask, params.gamma)
    return AdvantageOutput(masked_whiten(returns, inputs.mask) * inputs.mask)


def remax_advantages(inputs: AdvantageInputs, params: Any) -> AdvantageOutput:
    return AdvantageOutput(inputs.rewards - inputs.baselines)


@attrs.frozen
class GAEParams:
    gamma: float = attrs.field(default=1.0, validator=_unit)
    """Discount factor (trl's PPOConfig.gamma)."""
    lam: float = attrs.field(default=0.95, validator=_unit)
    """GAE's λ: 0 is one-step TD, 1 the Monte-Carlo return (trl's PPOConfig.lam)."""


def gae_advantages(inputs: AdvantageInputs, params: GAEParams) -> AdvantageOutput:
    advantages, returns = gae(inputs.token_rewards, inputs.values, inputs.mask, params.gamma, params.lam)
    return AdvantageOutput(masked_whiten(advantages, inputs.mask) * inputs.mask, returns=returns)


def _kl_when_weighted(params: Any) -> tuple[str, ...]:
    return ("reference",) if params.kl_coef > 0 else ()


@molting.hookimpl
def molting_register_advantages(register):
    register(Advantage(name="grpo", compute=grpo_advantages, params=GRPOAdvantageParams,
                       description="GRPO: the reward minus its group's mean, over the group's std (trl's default)."))
    register(Advantage(name="rloo", compute=rloo_advantages, params=RLOOParams, needs=_kl_when_weighted,
                       description="RLOO: the reward minus the mean reward of the other completions of its prompt."))
    register(Advantage(name="reinforce++", compute=reinforce_pp_advantages, params=ReinforcePPParams,
                       needs=_kl_when_weighted,
                       description="REINFORCE++: return-to-go with a token-level KL penalty, whitened over the batch."))
    register(Advantage(name="remax", compute=remax_advantages, needs=("greedy",),
                       description="ReMax: the reward minus the reward of the prompt's greedy completion."))
    register(Advantage(name="gae", compute=gae_advantages, params=GAEParams, needs=("values", "token_rewards"),
                       stages=("ppo",), description="GAE: generalised advantage estimates from a critic's values."))
