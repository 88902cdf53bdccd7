"""SPPO, hard-label version (Wu et al., 2024, arXiv:2405.00675, Eq. 4.7 with P = 1 for the winner, 0 for the loser).

    loss = (log π(y_w|x)/π_ref(y_w|x) - 1/(2β))² + (log π(y_l|x)/π_ref(y_l|x) + 1/(2β))²

Self-Play Preference Optimisation regresses each log-ratio to its own target
(+1/(2β) for the winner, -1/(2β) for the loser). The paper estimates soft
win probabilities with a preference model; this is the version with hard
labels from the data.
"""

from __future__ import annotations

import molting
from molting.components import Loss, LossOutput, PreferenceInputs
from molting.losses import BetaParams, logratios, output


def sppo_hard_loss(inputs: PreferenceInputs, params: BetaParams) -> LossOutput:
    chosen, rejected = logratios(inputs)
    losses = (chosen - 0.5 / params.beta) ** 2 + (rejected + 0.5 / params.beta) ** 2
    return output(losses, params.beta, chosen, rejected)


@molting.hookimpl
def molting_register_losses(register):
    register(
        Loss(
            name="sppo_hard",
            compute=sppo_hard_loss,
            params=BetaParams,
            stage="preference",
            description="SPPO (hard labels): squared loss pulling chosen/rejected log-ratios to ±1/(2β).",
        )
    )
