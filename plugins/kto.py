"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al., 2024, arXiv:2402.01306).

KTO learns from unpaired feedback: each example is one completion labelled
desirable or undesirable. With ``r = log π(y|x) − log π_ref(y|x)`` and the
reference point ``z₀``, the batch estimate of KL(π ‖ π_ref) that the
``unpaired`` stage computes from mismatched prompt/completion pairs
(detached, clamped at 0):

    desirable:   λ_D · (1 − σ(β·(r − z₀)))
    undesirable: λ_U · (1 − σ(β·(z₀ − r)))

λ_D is ``desirable_weight``, λ_U ``undesirable_weight`` (Eq. 7-8 of the
paper). This is trl's ``KTOTrainer`` with ``loss_type="kto"``, operation for
operation; the stage averages the per-example losses, as trl does. The
implicit reward of each completion is β·r.
"""

from __future__ import annotations

import attrs

import molting
from molting.components import Loss, LossOutput, UnpairedInputs


@attrs.frozen
class KTOParams:
    beta: float = attrs.field(default=0.1, validator=attrs.validators.gt(0))
    """Strength of the KL regularisation to the reference; the paper uses 0.1 (0.01-1 is usual)."""
    desirable_weight: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    """λ_D, the weight of the desirable examples' losses."""
    undesirable_weight: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    """λ_U, the weight of the undesirable examples' losses. Keep λ_D·n_D / (λ_U·n_U) in [1, 4/3]."""


def kto_loss(inputs: UnpairedInputs, params: KTOParams) -> LossOutput:
    import torch
    import torch.nn.functional as F

    if inputs.ref_logps is None or inputs.kl is None:
        raise ValueError("KTO needs the reference model's log-probs (ref_logps) and the KL estimate (kl)")
    labels = inputs.labels.bool()
    logratios = inputs.logps - inputs.ref_logps
    kl = inputs.kl
    desirable = params.desirable_weight * (1 - F.sigmoid(params.beta * (logratios - kl)))
    undesirable = params.undesirable_weight * (1 - F.sigmoid(params.beta * (kl - logratios)))
    rewards = params.beta * logratios.detach()
    return LossOutput(
        losses=torch.where(labels, desirable, undesirable),
        chosen_rewards=rewards[labels],
        rejected_rewards=rewards[~labels],
    )


@molting.hookimpl
def molting_register_losses(register):
    register(
        Loss(
            name="kto",
            compute=kto_loss,
            params=KTOParams,
            stage="unpaired",
            description="Kahneman-Tversky Optimization: desirable/undesirable completions against a KL reference point.",
        )
    )
