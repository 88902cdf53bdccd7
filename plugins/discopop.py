"""DiscoPOP (Lu et al., 2024, arXiv:2406.08414, Eq. 5): the log-ratio modulated loss found by LLM-driven search.

    z    = β·[log π(y_w|x)/π_ref(y_w|x) - log π(y_l|x)/π_ref(y_l|x)]
    m    = σ(z/τ)
    loss = (1 - m)·(-log σ(z)) + m·exp(-z)

A blend of the logistic (DPO) and the exponential loss, switched by the sign
of the margin with temperature τ (``discopop_tau``, 0.05 in the paper and
in trl). The product m·exp(-z) is computed as exp(log σ(z/τ) - z), which is
the same number but stays finite where z is very negative (there trl's
direct product is 0·inf = NaN).
"""

from __future__ import annotations

import attrs

import molting
from molting.components import Loss, LossOutput, PreferenceInputs
from molting.losses import BetaParams, logratios, output


@attrs.frozen
class DiscoPOPParams(BetaParams):
    discopop_tau: float = attrs.field(default=0.05, validator=attrs.validators.gt(0))
    """Temperature of the switch between the logistic and the exponential loss; the paper uses 0.05."""


def discopop_loss(inputs: PreferenceInputs, params: DiscoPOPParams) -> LossOutput:
    import torch
    import torch.nn.functional as F

    chosen, rejected = logratios(inputs)
    z = params.beta * (chosen - rejected)
    modulation = torch.sigmoid(z / params.discopop_tau)
    exp_part = torch.exp(F.logsigmoid(z / params.discopop_tau) - z)  # = modulation · exp(-z)
    losses = -F.logsigmoid(z) * (1 - modulation) + exp_part
    return output(losses, params.beta, chosen, rejected)


@molting.hookimpl
def molting_register_losses(register):
    register(
        Loss(
            name="discopop",
            compute=discopop_loss,
            params=DiscoPOPParams,
            stage="preference",
            description="DiscoPOP: logistic/exponential blend of the DPO margin, switched at temperature discopop_tau.",
        )
    )
