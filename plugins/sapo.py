"""SAPO: Soft Adaptive Policy Optimization (Gao et al., 2025, arXiv:2511.20347).

A smooth gate in place of the hard clip: the weight of a token's advantage
falls off smoothly as its importance ratio leaves 1, more steeply for
negative advantages,

    r_it = π(y_it | ·) / π_old(y_it | ·)
    τ_i  = τ_pos if A_i > 0 else τ_neg
    ℓ_it = -σ(τ_i·(r_it - 1))·(4/τ_i)·A_i

(at r = 1 the gradient is the plain policy gradient), then β·KL per token
and the mean per completion, as trl's ``loss_type="sapo"``.
"""

from __future__ import annotations

import attrs

import molting
from molting.components import GroupInputs, Loss, LossOutput
from molting.group_losses import KLParams, advantages_2d, finish, importance_weights


@attrs.frozen
class SAPOParams(KLParams):
    temperature_pos: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    """τ of tokens with a positive advantage (trl's sapo_temperature_pos)."""
    temperature_neg: float = attrs.field(default=1.05, validator=attrs.validators.gt(0))
    """τ of tokens with a non-positive advantage; a little steeper (trl's sapo_temperature_neg)."""


def sapo_loss(inputs: GroupInputs, params: SAPOParams) -> LossOutput:
    import torch

    weights = importance_weights(inputs)
    advantages = advantages_2d(inputs)
    tau = torch.where(advantages > 0, params.temperature_pos, params.temperature_neg)
    losses = -torch.sigmoid(tau * (weights - 1)) * 4 / tau * advantages
    return finish(losses, inputs, params, weights, "grpo")


@molting.hookimpl
def molting_register_losses(register):
    register(Loss(name="sapo", compute=sapo_loss, params=SAPOParams, stage="grpo", needs_reference=False,
                  description="SAPO: a smooth sigmoid gate on the importance ratio in place of GRPO's hard clip."))
