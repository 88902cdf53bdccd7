"""CPO: Contrastive Preference Optimization (Xu et al., 2024, arXiv:2401.08417).

DPO's sigmoid loss with the reference dropped (the uniform-reference
approximation) plus a behaviour-cloning NLL term on the chosen completion:

    z     = log π(y_w | x) − log π(y_l | x)                     summed log-probs (per-token means for ipo)
    loss  = −(1−ε)·log σ(β·z) − ε·log σ(−β·z) + α·NLL(y_w)      loss_type sigmoid (the paper's)
            relu(1 − β·z) + α·NLL(y_w)                           loss_type hinge
            (z − 1/(2β))² + α·NLL(y_w)                           loss_type ipo

as trl's ``CPOTrainer`` (``cpo_alpha`` α = 1.0, ``beta`` 0.1; NLL is the
mean over every chosen token of the batch). The implicit rewards are β·log π
of each completion, as trl logs them. SimPO (trl's ``loss_type="simpo"``)
ships as the outside example plugin under ``examples/``.
"""

from __future__ import annotations

import attrs

import molting
from molting.components import Loss, LossOutput, PreferenceInputs
from molting.losses import LabelSmoothingParams, chosen_nll, per_token, smoothed_sigmoid


@attrs.frozen
class CPOParams(LabelSmoothingParams):
    cpo_alpha: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    """Weight of the NLL term on the chosen completion (trl's cpo_alpha); 0 drops it."""
    loss_type: str = attrs.field(default="sigmoid", validator=attrs.validators.in_(("sigmoid", "hinge", "ipo")))
    """The contrastive term: the paper's sigmoid, a hinge, or IPO's square (on per-token mean log-probs)."""


def cpo_loss(inputs: PreferenceInputs, params: CPOParams) -> LossOutput:
    import torch

    chosen, rejected = inputs.chosen_logps, inputs.rejected_logps
    if params.loss_type == "ipo":
        chosen, rejected = per_token(chosen, inputs.chosen_lengths), per_token(rejected, inputs.rejected_lengths)
    z = chosen - rejected
    if params.loss_type == "sigmoid":
        losses = smoothed_sigmoid(params.beta * z, params.label_smoothing)
    elif params.loss_type == "hinge":
        losses = torch.relu(1 - params.beta * z)
    else:
        losses = (z - 1 / (2 * params.beta)) ** 2
    metrics = {}
    if params.cpo_alpha:
        nll = chosen_nll(inputs)
        losses = losses + params.cpo_alpha * nll
        metrics["nll_loss"] = nll.detach()
    return LossOutput(losses=losses, chosen_rewards=params.beta * chosen.detach(),
                      rejected_rewards=params.beta * rejected.detach(), metrics=metrics)


@molting.hookimpl
def molting_register_losses(register):
    register(Loss(name="cpo", compute=cpo_loss, params=CPOParams, stage="preference", needs_reference=False,
                  description="CPO: reference-free sigmoid preference loss plus an NLL term on the chosen response."))
