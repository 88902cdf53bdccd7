"""BCO for pairs (Jung et al., 2024, arXiv:2404.04656): binary classification of chosen vs rejected.

    r_w  = β·log π(y_w|x)/π_ref(y_w|x),   r_l = β·log π(y_l|x)/π_ref(y_l|x)
    loss = -log σ(r_w) - log σ(-r_l)

Each implicit reward is a logit of "this completion is good": chosen is
classified positive and rejected negative independently. (trl's pairwise
form, without the paper's reward shift δ or density-ratio matching.)
"""

from __future__ import annotations

import molting
from molting.components import Loss, LossOutput, PreferenceInputs
from molting.losses import BetaParams, logratios, output


def bco_pair_loss(inputs: PreferenceInputs, params: BetaParams) -> LossOutput:
    import torch.nn.functional as F

    chosen, rejected = logratios(inputs)
    losses = -F.logsigmoid(params.beta * chosen) - F.logsigmoid(-params.beta * rejected)
    return output(losses, params.beta, chosen, rejected)


@molting.hookimpl
def molting_register_losses(register):
    register(
        Loss(
            name="bco_pair",
            compute=bco_pair_loss,
            params=BetaParams,
            stage="preference",
            description="BCO (pairwise): classifies chosen as good and rejected as bad by their implicit rewards.",
        )
    )
