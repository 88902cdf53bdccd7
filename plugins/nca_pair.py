"""NCA for pairs (Chen et al., 2024, arXiv:2402.05369): noise-contrastive alignment on absolute rewards.

    r_w  = β·log π(y_w|x)/π_ref(y_w|x),   r_l = β·log π(y_l|x)/π_ref(y_l|x)
    loss = -log σ(r_w) - ½·log σ(-r_w) - ½·log σ(-r_l)

It scores each completion on its own rather than only their difference, so
the chosen likelihood is not driven down along with the rejected one (a
failure mode of DPO on reasoning data).
"""

from __future__ import annotations

import molting
from molting.components import Loss, LossOutput, PreferenceInputs
from molting.losses import BetaParams, logratios, output


def nca_pair_loss(inputs: PreferenceInputs, params: BetaParams) -> LossOutput:
    import torch.nn.functional as F

    chosen, rejected = logratios(inputs)
    r_w, r_l = params.beta * chosen, params.beta * rejected
    losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    return output(losses, params.beta, chosen, rejected)


@molting.hookimpl
def molting_register_losses(register):
    register(
        Loss(
            name="nca_pair",
            compute=nca_pair_loss,
            params=BetaParams,
            stage="preference",
            description="NCA (pairwise): noise-contrastive loss on each completion's own reward; keeps chosen likely.",
        )
    )
