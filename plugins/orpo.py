"""ORPO: Monolithic Preference Optimization without Reference Model (Hong et al., 2024, arXiv:2403.07691).

SFT on the chosen completion plus an odds-ratio term that makes it likelier
than the rejected one, with no reference model:

    p_w, p_l  = exp(mean_t log π(y_t | x, y_<t))               per-token average likelihood of each completion
    log OR    = log[p_w / (1 − p_w)] − log[p_l / (1 − p_l)]
    loss      = NLL(y_w) − λ·log σ(log OR)                     NLL: mean over every chosen token of the batch

as trl's ``ORPOTrainer`` (``beta`` is λ, 0.1 by default). ``log(1 − p)`` is
computed as trl's stable ``log1mexp``, on average log-probs clamped at
−1e-7 (where trl's gives NaN). The implicit rewards are λ·log p
(the average log-probs), as trl logs them; ``log_odds_ratio`` (the mean of
log σ(log OR)), ``log_odds_chosen`` (the mean log OR) and ``nll_loss`` are
logged under trl's names.
"""

from __future__ import annotations

import molting
from molting.components import Loss, LossOutput, PreferenceInputs
from molting.losses import BetaParams, chosen_nll, per_token


def log1mexp(x):
    """``log(1 − exp(x))`` for x < 0, without cancellation (branch at −log 2, as trl)."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(inputs: PreferenceInputs, params: BetaParams) -> LossOutput:
    import torch.nn.functional as F

    # a probability is at most 1: average log-probs above -1e-7 (or positive ones, which only a bug upstream gives)
    # are clamped so that log(1 - p) stays finite; trl's returns NaN there
    chosen = per_token(inputs.chosen_logps, inputs.chosen_lengths).float().clamp(max=-1e-7)
    rejected = per_token(inputs.rejected_logps, inputs.rejected_lengths).float().clamp(max=-1e-7)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = chosen_nll(inputs)
    metrics = {"log_odds_ratio": ratio.mean().detach(), "log_odds_chosen": log_odds.mean().detach(),
               "nll_loss": nll.detach()}
    return LossOutput(losses=nll - params.beta * ratio, chosen_rewards=params.beta * chosen.detach(),
                      rejected_rewards=params.beta * rejected.detach(), metrics=metrics)


@molting.hookimpl
def molting_register_losses(register):
    register(Loss(name="orpo", compute=orpo_loss, params=BetaParams, stage="preference", needs_reference=False,
                  description="ORPO: SFT on chosen plus a log odds-ratio term against rejected; no reference model."))
