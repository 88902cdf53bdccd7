"""CISPO: Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv:2506.13585; ScaleRL, arXiv:2510.13786).

Instead of clipping the surrogate, which drops the gradient of every clipped
token, CISPO clips the importance weight and stops its gradient, so every
token keeps a REINFORCE gradient through its log-prob:

    r_it = π(y_it | ·) / π_old(y_it | ·)
    ℓ_it = -sg[min(r_it, ε_max)]·A_i·log π(y_it | ·)

then β·KL per token and DAPO's normaliser (the generation batch's completion
tokens), as trl's ``loss_type="cispo"``. ``epsilon_high`` is ε_max itself,
not 1 + ε: ScaleRL recommends 5.0. ``cispo_clip_ratio`` counts the tokens
whose weight was capped (with a positive advantage), trl's metric.
"""

from __future__ import annotations

import attrs

import molting
from molting.components import GroupInputs, Loss, LossOutput
from molting.group_losses import KLParams, advantages_2d, finish, importance_weights


@attrs.frozen
class CISPOParams(KLParams):
    epsilon_high: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    """ε_max, the cap on the importance weight (not 1 + ε); ScaleRL recommends 5.0."""


def cispo_loss(inputs: GroupInputs, params: CISPOParams) -> LossOutput:
    import torch

    weights = importance_weights(inputs)
    advantages = advantages_2d(inputs)
    losses = -torch.clamp(weights, max=params.epsilon_high).detach() * advantages * inputs.logps
    capped = (weights > params.epsilon_high) & (advantages > 0)
    return finish(losses, inputs, params, weights, "dapo", {"cispo_clip_ratio": capped})


@molting.hookimpl
def molting_register_losses(register):
    register(Loss(name="cispo", compute=cispo_loss, params=CISPOParams, stage="grpo", needs_reference=False,
                  description="CISPO: REINFORCE through every token's log-prob, weighted by a capped, detached ratio."))
