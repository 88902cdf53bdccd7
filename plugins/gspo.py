"""GSPO: Group Sequence Policy Optimization (Zheng et al., 2025, arXiv:2507.18071).

GRPO's clipped surrogate with one importance weight per sequence instead of
one per token: the geometric mean of the token ratios,

    s_i = exp( (1/M_i)·Σ_t log[π(y_it | ·) / π_old(y_it | ·)] )
    ℓ_i = -min(s_i·A_i, clip(s_i, 1 - ε, 1 + ε_high)·A_i)       for every token t of completion i

then β·KL per token and the mean per completion (trl's ``loss_type="grpo"``
with ``importance_sampling_level="sequence"``). The clipping range is
narrow because s_i is a length-normalised ratio: the paper uses
ε = 3e-4, ε_high = 4e-4. ``clip_ratio/*`` count clipped sequences.
"""

from __future__ import annotations

import attrs

import molting
from molting.components import GroupInputs, Loss, LossOutput
from molting.group_losses import KLParams, advantages_2d, clipped_surrogate, finish, importance_weights


@attrs.frozen
class GSPOParams(KLParams):
    epsilon: float = attrs.field(default=3e-4, validator=attrs.validators.gt(0))
    """Lower clipping bound of the sequence weight: 1 - epsilon (the paper: 3e-4)."""
    epsilon_high: float = attrs.field(default=4e-4, validator=attrs.validators.gt(0))
    """Upper clipping bound: 1 + epsilon_high (the paper: 4e-4)."""


def gspo_loss(inputs: GroupInputs, params: GSPOParams) -> LossOutput:
    weights = importance_weights(inputs, level="sequence")  # (B, 1)
    losses, metrics = clipped_surrogate(weights, advantages_2d(inputs), params.epsilon, params.epsilon_high)
    return finish(losses, inputs, params, weights, "grpo", metrics)


@molting.hookimpl
def molting_register_losses(register):
    register(Loss(name="gspo", compute=gspo_loss, params=GSPOParams, stage="grpo", needs_reference=False,
                  description="GSPO: GRPO's clipped surrogate on a sequence-level importance ratio (geometric mean)."))
