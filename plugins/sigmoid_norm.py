"""Length-normalised DPO, as used for Tülu 3 (Lambert et al., 2024, arXiv:2411.15124).

    h    = log π(y_w|x)/π_ref(y_w|x) / |y_w|  -  log π(y_l|x)/π_ref(y_l|x) / |y_l|
    loss = -log σ(β·h)

DPO on per-token instead of summed log-ratios, which removes DPO's pull
towards longer completions. Per-token margins are much smaller than summed
ones, so β is much larger than DPO's (Tülu 3 used β = 5).
"""

from __future__ import annotations

import molting
from molting.components import Loss, LossOutput, PreferenceInputs
from molting.losses import BetaParams, logratios, output, per_token


def sigmoid_norm_loss(inputs: PreferenceInputs, params: BetaParams) -> LossOutput:
    import torch.nn.functional as F

    chosen, rejected = logratios(inputs)
    h = per_token(chosen, inputs.chosen_lengths) - per_token(rejected, inputs.rejected_lengths)
    return output(-F.logsigmoid(params.beta * h), params.beta, chosen, rejected)


@molting.hookimpl
def molting_register_losses(register):
    register(
        Loss(
            name="sigmoid_norm",
            compute=sigmoid_norm_loss,
            params=BetaParams,
            stage="preference",
            description="Length-normalised DPO: sigmoid loss on the per-token log-ratio margin; no length bias.",
        )
    )
