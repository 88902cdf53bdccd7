"""SimPO: Simple Preference Optimization with a reference-free reward (Meng et al., 2024, arXiv:2405.14734).

The implicit reward is the policy's length-normalised log-probability, and a
target margin γ separates chosen from rejected:

    loss = -log σ( β/|y_w| · log π(y_w|x) - β/|y_l| · log π(y_l|x) - γ )

No reference model is needed, so the stage loads none.
"""

from __future__ import annotations

import attrs

import molting


@attrs.frozen
class SimPOParams:
    beta: float = attrs.field(default=2.0, validator=attrs.validators.gt(0))
    """Reward scale β; the paper uses 2.0-2.5."""
    gamma: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    """Target reward margin γ; the paper uses 0.5-1.5 (γ/β ≈ 0.5)."""
    label_smoothing: float = attrs.field(default=0.0, validator=[attrs.validators.ge(0), attrs.validators.lt(0.5)])
    """Assumed probability that a preference label is flipped."""


def simpo_loss(inputs: molting.PreferenceInputs, params: SimPOParams) -> molting.LossOutput:
    import torch.nn.functional as F

    chosen_rewards = params.beta * inputs.chosen_logps / inputs.chosen_lengths
    rejected_rewards = params.beta * inputs.rejected_logps / inputs.rejected_lengths
    logits = chosen_rewards - rejected_rewards - params.gamma
    eps = params.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return molting.LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


@molting.hookimpl
def molting_register_losses(register):
    register(
        molting.Loss(
            name="simpo",
            compute=simpo_loss,
            params=SimPOParams,
            stage="preference",
            needs_reference=False,
            description="SimPO: reference-free, length-normalised preference loss with a target margin γ.",
        )
    )
