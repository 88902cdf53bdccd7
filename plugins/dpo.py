"""DPO: Direct Preference Optimization (Rafailov et al., 2023, arXiv:2305.18290).

    loss = -log σ(β·[log π(y_w|x)/π_ref(y_w|x) - log π(y_l|x)/π_ref(y_l|x)])

With ``label_smoothing`` ε > 0 this is conservative DPO (cDPO, Mitchell
2023), which assumes each label is flipped with probability ε:

    loss = -(1 - ε)·log σ(β·h) - ε·log σ(-β·h)

The implicit rewards are β·log π/π_ref of each completion.
"""

from __future__ import annotations

import attrs

import molting
from molting.components import Loss, LossOutput, PreferenceInputs


@attrs.frozen
class DPOParams:
    beta: float = attrs.field(default=0.1, validator=attrs.validators.gt(0))
    """Strength of the KL regularisation to the reference; 0.1-0.5 is usual."""
    label_smoothing: float = attrs.field(default=0.0, validator=[attrs.validators.ge(0), attrs.validators.lt(0.5)])
    """Assumed probability that a preference label is flipped (cDPO); 0 is plain DPO."""


def dpo_loss(inputs: PreferenceInputs, params: DPOParams) -> LossOutput:
    import torch.nn.functional as F

    chosen_logratios = inputs.chosen_logps - inputs.ref_chosen_logps
    rejected_logratios = inputs.rejected_logps - inputs.ref_rejected_logps
    logits = params.beta * (chosen_logratios - rejected_logratios)
    eps = params.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return LossOutput(
        losses=losses,
        chosen_rewards=params.beta * chosen_logratios.detach(),
        rejected_rewards=params.beta * rejected_logratios.detach(),
    )


@molting.hookimpl
def molting_register_losses(register):
    register(
        Loss(
            name="dpo",
            compute=dpo_loss,
            params=DPOParams,
            stage="preference",
            description="Direct Preference Optimization: sigmoid loss on the policy/reference log-ratio margin.",
        )
    )
