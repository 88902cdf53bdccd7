"""APO-down (D'Oosterlinck et al., 2024, arXiv:2408.06266, Eq. 8): anchored preference optimisation.

    r_w  = β·log π(y_w|x)/π_ref(y_w|x),   r_l = β·log π(y_l|x)/π_ref(y_l|x)
    loss = σ(r_w) + (1 - σ(r_w - r_l))

Lowers the chosen likelihood and the rejected one more. Use it when even the
chosen completions are worse than what the model produces now.
"""

from __future__ import annotations

import molting
from molting.components import Loss, LossOutput, PreferenceInputs
from molting.losses import BetaParams, logratios, output


def apo_down_loss(inputs: PreferenceInputs, params: BetaParams) -> LossOutput:
    import torch

    chosen, rejected = logratios(inputs)
    beta = params.beta
    losses = torch.sigmoid(beta * chosen) + (1 - torch.sigmoid(beta * (chosen - rejected)))
    return output(losses, beta, chosen, rejected)


@molting.hookimpl
def molting_register_losses(register):
    register(
        Loss(
            name="apo_down",
            compute=apo_down_loss,
            params=BetaParams,
            stage="preference",
            description="APO-down: lower chosen and rejected likelihood, rejected more; for chosen worse than the model.",
        )
    )
