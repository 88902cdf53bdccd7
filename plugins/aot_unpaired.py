"""AOT, unpaired (Melnyk et al., 2024, arXiv:2406.05882): alignment via optimal transport, without pairing.

    c_i  = log π(y_w|x_i)/π_ref(y_w|x_i),   r_i = log π(y_l|x_i)/π_ref(y_l|x_i)
    loss_k = -(1-ε)·log σ(β·(c_(k) - r_(k))) - ε·log σ(-β·(c_(k) - r_(k)))

where c_(k), r_(k) are the k-th smallest over the batch: the distribution
of chosen log-ratios is asked to dominate that of rejected log-ratios, with
no use of which chosen went with which rejected. trl calls it
``aot_unpaired``. As for ``aot``, the per-example values belong to ranks and
only their batch mean is meaningful. ε is ``label_smoothing``, as in cDPO.
"""

from __future__ import annotations

import molting
from molting.components import Loss, LossOutput, PreferenceInputs
from molting.losses import LabelSmoothingParams, logratios, output, smoothed_sigmoid


def aot_unpaired_loss(inputs: PreferenceInputs, params: LabelSmoothingParams) -> LossOutput:
    import torch

    chosen, rejected = logratios(inputs)
    chosen_sorted, _ = torch.sort(chosen, dim=0)
    rejected_sorted, _ = torch.sort(rejected, dim=0)
    losses = smoothed_sigmoid(params.beta * (chosen_sorted - rejected_sorted), params.label_smoothing)
    return output(losses, params.beta, chosen, rejected)


@molting.hookimpl
def molting_register_losses(register):
    register(
        Loss(
            name="aot_unpaired",
            compute=aot_unpaired_loss,
            params=LabelSmoothingParams,
            stage="preference",
            description="AOT (unpaired): DPO on sorted chosen vs sorted rejected log-ratios; ignores the pairing.",
        )
    )
