"""AOT, paired (Melnyk et al., 2024, arXiv:2406.05882): alignment via optimal transport.

    d_i  = log π(y_w|x_i) - log π(y_l|x_i)            policy's chosen-minus-rejected log-prob, per pair
    e_i  = log π_ref(y_w|x_i) - log π_ref(y_l|x_i)    the same for the reference
    loss_k = -(1-ε)·log σ(β·(d_(k) - e_(k))) - ε·log σ(-β·(d_(k) - e_(k)))

where d_(k), e_(k) are the k-th smallest over the batch. Sorting both sides
solves the one-dimensional optimal-transport problem, so the loss asks that
the *distribution* of policy margins dominate the reference's (first-order
stochastic dominance) rather than each pair's margin. The per-example
values therefore belong to ranks, not to input rows; only their mean is
meaningful, and it depends on the batch (use batches of 8 or more). ε is
``label_smoothing``, as in cDPO.
"""

from __future__ import annotations

import molting
from molting.components import Loss, LossOutput, PreferenceInputs
from molting.losses import LabelSmoothingParams, logratios, output, smoothed_sigmoid


def aot_loss(inputs: PreferenceInputs, params: LabelSmoothingParams) -> LossOutput:
    import torch

    chosen, rejected = logratios(inputs)
    policy, _ = torch.sort(inputs.chosen_logps - inputs.rejected_logps, dim=0)
    reference, _ = torch.sort(inputs.ref_chosen_logps - inputs.ref_rejected_logps, dim=0)
    losses = smoothed_sigmoid(params.beta * (policy - reference), params.label_smoothing)
    return output(losses, params.beta, chosen, rejected)


@molting.hookimpl
def molting_register_losses(register):
    register(
        Loss(
            name="aot",
            compute=aot_loss,
            params=LabelSmoothingParams,
            stage="preference",
            description="AOT (paired): DPO on sorted batch margins, so policy margins dominate the reference's.",
        )
    )
