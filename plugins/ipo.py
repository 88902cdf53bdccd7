"""IPO: Identity Preference Optimisation (Azar et al., 2023, arXiv:2310.12036), length-averaged as trl does.

    h    = log π(y_w|x)/π_ref(y_w|x) / |y_w|  -  log π(y_l|x)/π_ref(y_l|x) / |y_l|
    loss = (h - 1/(2β))²

A squared loss that regresses the margin to 1/(2β) instead of pushing it to
infinity, so it does not overfit deterministic preferences. β is the paper's
τ. The log-ratios are divided by the completion token counts (trl's choice,
confirmed with the IPO authors) so that β means the same at any length.
"""

from __future__ import annotations

import molting
from molting.components import Loss, LossOutput, PreferenceInputs
from molting.losses import BetaParams, logratios, output, per_token


def ipo_loss(inputs: PreferenceInputs, params: BetaParams) -> LossOutput:
    chosen, rejected = logratios(inputs)
    h = per_token(chosen, inputs.chosen_lengths) - per_token(rejected, inputs.rejected_lengths)
    return output((h - 1 / (2 * params.beta)) ** 2, params.beta, chosen, rejected)


@molting.hookimpl
def molting_register_losses(register):
    register(
        Loss(
            name="ipo",
            compute=ipo_loss,
            params=BetaParams,
            stage="preference",
            description="IPO: squared loss pulling the per-token log-ratio margin to 1/(2β); resists overfitting.",
        )
    )
