"""Hinge loss on the DPO margin, as in SLiC (Zhao et al., 2023, arXiv:2305.10425) and RSO (arXiv:2309.06657).

    h    = log π(y_w|x)/π_ref(y_w|x) - log π(y_l|x)/π_ref(y_l|x)
    loss = max(0, 1 - β·h)

Pairs whose scaled margin already exceeds 1 contribute no gradient; 1/β is
the margin the policy is asked to reach.
"""

from __future__ import annotations

import molting
from molting.components import Loss, LossOutput, PreferenceInputs
from molting.losses import BetaParams, logratios, output


def hinge_loss(inputs: PreferenceInputs, params: BetaParams) -> LossOutput:
    import torch

    chosen, rejected = logratios(inputs)
    return output(torch.relu(1 - params.beta * (chosen - rejected)), params.beta, chosen, rejected)


@molting.hookimpl
def molting_register_losses(register):
    register(
        Loss(
            name="hinge",
            compute=hinge_loss,
            params=BetaParams,
            stage="preference",
            description="Hinge (SLiC) loss on the log-ratio margin: no gradient once β·margin exceeds 1.",
        )
    )
