"""Robust DPO (rDPO; Chowdhury et al., 2024, arXiv:2403.00409): DPO made unbiased under label noise.

    z    = β·[log π(y_w|x)/π_ref(y_w|x) - log π(y_l|x)/π_ref(y_l|x)]
    loss = [-(1-ε)·log σ(z) + ε·log σ(-z)] / (1 - 2ε)

ε (``label_smoothing``, in [0, 0.5)) is the assumed probability that a
label is flipped; the estimator de-biases the loss for that noise. With
ε = 0 it is plain DPO; the paper suggests ε = 0.1 for noisy data.
"""

from __future__ import annotations

import molting
from molting.components import Loss, LossOutput, PreferenceInputs
from molting.losses import LabelSmoothingParams, logratios, output


def robust_loss(inputs: PreferenceInputs, params: LabelSmoothingParams) -> LossOutput:
    import torch.nn.functional as F

    chosen, rejected = logratios(inputs)
    z, eps = params.beta * (chosen - rejected), params.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return output(losses, params.beta, chosen, rejected)


@molting.hookimpl
def molting_register_losses(register):
    register(
        Loss(
            name="robust",
            compute=robust_loss,
            params=LabelSmoothingParams,
            stage="preference",
            description="Robust DPO: DPO de-biased for labels flipped with probability label_smoothing.",
        )
    )
