"""APO-zero (D'Oosterlinck et al., 2024, arXiv:2408.06266, Eq. 7): anchored preference optimisation.

    r_w  = β·log π(y_w|x)/π_ref(y_w|x),   r_l = β·log π(y_l|x)/π_ref(y_l|x)
    loss = (1 - σ(r_w)) + σ(r_l)

Raises the chosen likelihood and lowers the rejected one, each anchored at
the reference. Use it when the chosen completions are better than what the
model produces now.
"""

from __future__ import annotations

import molting
from molting.components import Loss, LossOutput, PreferenceInputs
from molting.losses import BetaParams, logratios, output


def apo_zero_loss(inputs: PreferenceInputs, params: BetaParams) -> LossOutput:
    import torch

    chosen, rejected = logratios(inputs)
    losses = (1 - torch.sigmoid(params.beta * chosen)) + torch.sigmoid(params.beta * rejected)
    return output(losses, params.beta, chosen, rejected)


@molting.hookimpl
def molting_register_losses(register):
    register(
        Loss(
            name="apo_zero",
            compute=apo_zero_loss,
            params=BetaParams,
            stage="preference",
            description="APO-zero: raise chosen and lower rejected likelihood; for chosen better than the model.",
        )
    )
