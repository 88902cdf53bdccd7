"""SFT on the chosen completions: the negative log-likelihood term of RPO (Pang et al., 2024, arXiv:2404.19733).

    loss = -(1/N)·Σ_i Σ_t log π(y_w,i,t | x_i, y_w,i,<t)      N = chosen tokens in the batch

A batch-level mean over all chosen tokens (as trl computes it), repeated for
every example so that the stage's mean returns it unchanged. Long chosen
completions therefore weigh more than short ones. On its own it is plain
supervised fine-tuning on the chosen side of the pairs; trl combines it
with a preference loss (RPO, MPO). It needs no reference model; when the
reference log-probs are given, the implicit rewards β·log π/π_ref are
returned for logging, as trl logs them.
"""

from __future__ import annotations

import molting
from molting.components import Loss, LossOutput, PreferenceInputs
from molting.losses import BetaParams, chosen_nll, logratios, output


def sft_loss(inputs: PreferenceInputs, params: BetaParams) -> LossOutput:
    losses = chosen_nll(inputs).expand(inputs.chosen_logps.size(0))
    if inputs.ref_chosen_logps is None or inputs.ref_rejected_logps is None:
        return LossOutput(losses=losses)
    return output(losses, params.beta, *logratios(inputs))


@molting.hookimpl
def molting_register_losses(register):
    register(
        Loss(
            name="sft",
            compute=sft_loss,
            params=BetaParams,
            stage="preference",
            description="SFT on chosen: mean negative log-likelihood of the chosen tokens; needs no reference.",
            needs_reference=False,
        )
    )
