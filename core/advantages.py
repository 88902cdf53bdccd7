"""What advantage estimators share: masked statistics, group statistics, discounted sums, GAE.

An estimator (a :class:`molting.Advantage`, registered through
``molting_register_advantages``) is a pure function of an
:class:`molting.AdvantageInputs`; these are its building blocks, written
once so that each estimator is a few lines of its paper's formula and the
stages (``grpo``, ``ppo``) stay out of the math. torch is imported inside
the functions.
"""

from __future__ import annotations

from typing import Any


def masked_mean(values: Any, mask: Any) -> Any:
    """The mean of ``values`` over the entries where ``mask`` is 1."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: Any, mask: Any, shift_mean: bool = True) -> Any:
    """``(values - mean) / std`` over the masked entries (Bessel's correction), as trl's PPO whitens;
    ``shift_mean=False`` adds the mean back (scale only)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    whitened = (values - mean) * (variance + 1e-8).rsqrt()
    return whitened if shift_mean else whitened + mean


def group_stats(values: Any, groups: Any) -> tuple[Any, Any, Any]:
    """Per row: the mean, the standard deviation (Bessel's correction; 0 for a group of one) and the size of
    the row's group. Groups are ids, not necessarily contiguous."""
    import torch

    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    counts = counts.to(values.dtype)
    means = torch.zeros_like(counts).index_add_(0, inverse, values) / counts
    squares = torch.zeros_like(counts).index_add_(0, inverse, (values - means[inverse]) ** 2)
    stds = (squares / (counts - 1).clamp(min=1)).sqrt()
    return means[inverse], stds[inverse], counts[inverse]


def fill_skipped(rewards: Any, groups: Any) -> tuple[Any, Any]:
    """Rewards with each NaN (a judgement the run skipped, ``judge_on_error: skip``) replaced by its group's
    mean judged reward (0 where none was judged), and where they were: a stage gives those completions no
    advantage, so they teach nothing, while the group's statistics keep their size."""
    import torch

    skipped = torch.isnan(rewards)
    if not skipped.any():
        return rewards, skipped
    judged = (~skipped).to(rewards.dtype)
    _, inverse = torch.unique(groups, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, dtype=rewards.dtype, device=rewards.device)
    sums = sums.index_add(0, inverse, torch.where(skipped, 0.0, rewards))
    counts = torch.zeros_like(sums).index_add(0, inverse, judged)
    means = torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)
    return torch.where(skipped, means[inverse], rewards), skipped


def last_positions(mask: Any) -> Any:
    """Each row's last counted position (0 for a row with none): with a multi-turn episode's mask, which has gaps
    where the environment wrote, the model's last token."""
    import torch

    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, 0).max(dim=1).values


def last_token_rewards(rewards: Any, mask: Any) -> Any:
    """``(N, T)``: each row's reward on its last counted token, 0 elsewhere (a row with no token gets none)."""
    import torch

    token_rewards = torch.zeros_like(mask, dtype=rewards.dtype)
    rows = torch.nonzero(mask.sum(dim=1) > 0).squeeze(1)
    token_rewards[rows, last_positions(mask)[rows]] = rewards[rows]
    return token_rewards


def discounted_returns(token_rewards: Any, mask: Any, gamma: float) -> Any:
    """``G_t = Σ_{s ≥ t} γ^(s-t)·r_s`` over each row's counted tokens (REINFORCE's return-to-go); uncounted
    positions (an environment's tokens inside an episode) are stepped over, not discounted through."""
    import torch

    token_rewards = token_rewards * mask
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.size(1))):
        running = torch.where(mask[:, t] > 0, token_rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return returns * mask


def gae(token_rewards: Any, values: Any, mask: Any, gamma: float, lam: float) -> tuple[Any, Any]:
    """Generalised advantage estimates and returns (Schulman et al., 2016, arXiv:1506.02438), ``(N, T)`` each:
    ``δ_t = r_t + γ·V_{t+1} − V_t``, ``A_t = Σ_l (γλ)^l·δ_{t+l}``, returns ``A + V``.

    ``t + 1`` is the row's next counted position: an environment's tokens
    inside a multi-turn episode (mask 0) are stepped over, as verl's
    multi-turn GAE does; on a mask without gaps this is the usual recursion.
    """
    import torch

    values = values * mask
    advantages = torch.zeros_like(token_rewards)
    last = torch.zeros_like(token_rewards[:, 0])
    following = torch.zeros_like(last)
    for t in reversed(range(token_rewards.size(1))):
        counted = mask[:, t] > 0
        delta = token_rewards[:, t] + gamma * following - values[:, t]
        estimate = delta + gamma * lam * last
        advantages[:, t] = estimate
        last = torch.where(counted, estimate, last)
        following = torch.where(counted, values[:, t], following)
    advantages = advantages * mask
    return advantages, advantages + values
