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
from molting.losses import logratios, output, smoothed_sigmoid


@attrs.frozen
class DPOParams:
    beta: float = attrs.field(default=0.1, validator=attrs.validators.gt(0))
    """Strength of the KL regularisation to the reference; 0.1-0.5 is usual."""
    label_smoothing: float = attrs.field(default=0.0, validator=[attrs.validators.ge(0), attrs.validators.lt(0.5)])
    """Assumed probability that a preference label is flipped (cDPO); 0 is plain DPO."""


def dpo_loss(inputs: PreferenceInputs, params: DPOParams) -> LossOutput:
    chosen_logratios, rejected_logratios = logratios(inputs)
    logits = params.beta * (chosen_logratios - rejected_logratios)
    return output(smoothed_sigmoid(logits, params.label_smoothing), params.beta, chosen_logratios, rejected_logratios)


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
