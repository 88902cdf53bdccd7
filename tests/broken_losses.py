"""Deliberately broken losses: each one must fail the conformance check named beside it."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

import molting
from molting.plugins.dpo import DPOParams
from molting.plugins.grpo_losses import GRPOLossParams, per_token_losses
from molting.plugins.kto import KTOParams
from molting.plugins.reward import BradleyTerryParams


def _logits(inputs, beta):
    return beta * ((inputs.chosen_logps - inputs.ref_chosen_logps) - (inputs.rejected_logps - inputs.ref_rejected_logps))


def wrong_sign(inputs, params):
    return molting.LossOutput(F.logsigmoid(_logits(inputs, params.beta)))


def reduced(inputs, params):
    return molting.LossOutput(-F.logsigmoid(_logits(inputs, params.beta)).mean())


def mutates(inputs, params):
    inputs.chosen_logps.sub_(1.0)
    return molting.LossOutput(-F.logsigmoid(_logits(inputs, params.beta)))


def noisy(inputs, params):
    z = _logits(inputs, params.beta)
    return molting.LossOutput(-F.logsigmoid(z) + 1e-3 * torch.rand_like(z))


def batch_coupled(inputs, params):
    z = _logits(inputs, params.beta)
    return molting.LossOutput(-F.logsigmoid(z - z[0]))  # relative to whichever example comes first


def naive_log_sigmoid(inputs, params):
    return molting.LossOutput(-torch.log(torch.sigmoid(_logits(inputs, params.beta))))


def crashes(inputs, params):
    return molting.LossOutput(-F.logsigmoid(inputs.chosen_logits))


def nan_first(inputs, params):
    losses = -F.logsigmoid(_logits(inputs, params.beta))
    return molting.LossOutput(torch.where(torch.arange(len(losses)) == 0, torch.nan, losses))  # the same NaN each call


# --------------------------------------------------------------------------- other stages' inputs


def group_reduced(inputs, params):  # GroupInputs: one scalar for the micro-batch instead of one loss per completion
    losses, _ = per_token_losses(inputs, params)
    return molting.LossOutput((losses * inputs.mask).sum() / inputs.mask.sum())


def group_unmasked(inputs, params):  # averages over the padding as well
    losses, _ = per_token_losses(inputs, params)
    return molting.LossOutput(losses.mean(dim=1))


def group_cumulative(inputs, params):  # each completion's loss adds the ones before it
    losses, _ = per_token_losses(inputs, params)
    return molting.LossOutput(((losses * inputs.mask).sum(dim=1) / inputs.mask.sum(dim=1).clamp(min=1)).cumsum(0))


def _kto(inputs, params, sign):
    z = params.beta * (inputs.logps - inputs.ref_logps - inputs.kl)
    return torch.where(inputs.labels, 1 - torch.sigmoid(sign * z), 1 - torch.sigmoid(-sign * z))


def unpaired_wrong_sign(inputs, params):  # rewards undesirable completions, punishes desirable ones
    return molting.LossOutput(_kto(inputs, params, -1))


def unpaired_mutates_kl(inputs, params):
    inputs.kl.clamp_(min=0.5)
    return molting.LossOutput(_kto(inputs, params, 1))


def unpaired_rewards_for_all(inputs, params):  # the stage averages chosen_rewards over the desirable examples
    rewards = params.beta * (inputs.logps - inputs.ref_logps).detach()
    return molting.LossOutput(_kto(inputs, params, 1), chosen_rewards=rewards, rejected_rewards=rewards)


def reward_wrong_sign(inputs, params):
    return molting.LossOutput(-F.logsigmoid(inputs.rejected_rewards - inputs.chosen_rewards))


def reward_naive(inputs, params):
    return molting.LossOutput(-torch.log(torch.sigmoid(inputs.chosen_rewards - inputs.rejected_rewards)))


@attrs.frozen
class Unvalidated:
    beta: float = 0.1


def loss(name, fn, params=DPOParams, stage="preference", needs_reference=True):
    return molting.Loss(name=name, compute=fn, params=params, stage=stage, needs_reference=needs_reference,
                        description=f"Broken on purpose: {name}.")


def group(name, fn):
    return loss(name, fn, GRPOLossParams, stage="grpo", needs_reference=False)


def unpaired(name, fn):
    return loss(name, fn, KTOParams, stage="unpaired")


def reward(name, fn):
    return loss(name, fn, BradleyTerryParams, stage="reward-model", needs_reference=False)


BROKEN = {
    # loss → the check it must fail, and a phrase of the message
    "wrong-sign": (loss("wrong-sign", wrong_sign), "gradient-direction", "expected < 0 so that training raises the chosen"),
    "reduced": (loss("reduced", reduced), "output-shapes", "losses has shape () for a batch of 5; expected (5,)"),
    "mutates": (loss("mutates", mutates), "inputs-not-mutated", "changed its inputs in place: chosen_logps"),
    "noisy": (loss("noisy", noisy), "deterministic", "two calls gave"),
    "batch-coupled": (loss("batch-coupled", batch_coupled), "batch-independence", "depend on the other examples"),
    "naive": (loss("naive", naive_log_sigmoid), "finite-on-extreme-inputs", "losses are not finite for log-probs of ±1e4"),
    "crashes": (loss("crashes", crashes), "output-shapes", "raised AttributeError"),
    "unvalidated": (loss("unvalidated", wrong_sign, Unvalidated), "params-reject-bad-values",
                    "Unvalidated(beta=nan) was accepted. Fix: add an attrs validator to beta"),
    "nan": (loss("nan", nan_first), "deterministic", "the loss returned NaN for examples [0] of plain inputs"),
    # GroupInputs (stage grpo)
    "group-reduced": (group("group-reduced", group_reduced), "output-shapes",
                      "losses has shape () for a batch of 5; expected (5,). Fix: return one loss per example"),
    "group-unmasked": (group("group-unmasked", group_unmasked), "gradient-direction",
                       "d loss / d logps on the padding (mask 0) = ["),
    "group-cumulative": (group("group-cumulative", group_cumulative), "batch-independence",
                         "depend on the other examples"),
    # UnpairedInputs (stage unpaired)
    "unpaired-wrong-sign": (unpaired("unpaired-wrong-sign", unpaired_wrong_sign), "gradient-direction",
                            "d loss / d logps of the desirable examples = [0.025, 0.025]; expected < 0 so that "
                            "training raises a desirable completion's probability"),
    "unpaired-mutates-kl": (unpaired("unpaired-mutates-kl", unpaired_mutates_kl), "inputs-not-mutated",
                            "changed its inputs in place: kl"),
    "unpaired-rewards-for-all": (unpaired("unpaired-rewards-for-all", unpaired_rewards_for_all), "output-shapes",
                                 "chosen_rewards has shape (5,); expected (4,) (one per desirable example"),
    # RewardInputs (stage reward-model)
    "reward-wrong-sign": (reward("reward-wrong-sign", reward_wrong_sign), "gradient-direction",
                          "expected < 0 so that training raises the chosen response's reward"),
    "reward-naive": (reward("reward-naive", reward_naive), "finite-on-extreme-inputs",
                     "losses are not finite for rewards of ±1e4"),
}
