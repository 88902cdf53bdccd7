"""EXO for pairs (Ji et al., 2024, arXiv:2402.00856, Eq. 16): exact optimisation of the KL-regularised reward.

    z    = β·[log π(y_w|x)/π_ref(y_w|x) - log π(y_l|x)/π_ref(y_l|x)]
    q    = (σ(z), σ(-z))                      the policy's preference over the pair
    p    = (1 - ε, ε)                         the (smoothed) label
    loss = KL(q ‖ p) = σ(z)·[log σ(z) - log(1-ε)] + σ(-z)·[log σ(-z) - log ε]

Unlike DPO (which minimises KL(p ‖ q)) this is mode-seeking. ε
(``label_smoothing``) must lie strictly between 0 and 1 because the loss
takes log ε and log(1 - ε); the paper recommends 1e-3, which is the default
here (trl's default of 0 is rejected by its trainer).
"""

from __future__ import annotations

import math
from typing import Any

import attrs

import molting
from molting.components import Loss, LossOutput, PreferenceInputs
from molting.losses import BetaParams, logratios, output


def _strictly_between_0_and_1(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0 < value < 1:
        raise ValueError(
            f"exo_pair needs 0 < label_smoothing < 1, got {value!r}: the loss takes log(ε) and log(1 - ε), "
            "which are infinite at 0 and 1 (the EXO paper recommends 1e-3)"
        )


@attrs.frozen
class EXOParams(BetaParams):
    label_smoothing: float = attrs.field(default=1e-3, validator=_strictly_between_0_and_1)
    """ε of the smoothed label distribution (1 - ε, ε); strictly between 0 and 1, 1e-3 as in the paper."""


def exo_pair_loss(inputs: PreferenceInputs, params: EXOParams) -> LossOutput:
    import torch
    import torch.nn.functional as F

    chosen, rejected = logratios(inputs)
    z, eps = params.beta * (chosen - rejected), params.label_smoothing
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return output(losses, params.beta, chosen, rejected)


@molting.hookimpl
def molting_register_losses(register):
    register(
        Loss(
            name="exo_pair",
            compute=exo_pair_loss,
            params=EXOParams,
            stage="preference",
            description="EXO (pairwise): reverse KL from the policy's pair preference to the label smoothed by ε.",
        )
    )
