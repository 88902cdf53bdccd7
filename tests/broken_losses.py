"""Deliberately broken losses: each one must fail the conformance check named beside it."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

import molting
from molting.plugins.dpo import DPOParams


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


@attrs.frozen
class Unvalidated:
    beta: float = 0.1


def loss(name, fn, params=DPOParams):
    return molting.Loss(name=name, compute=fn, params=params, description=f"Broken on purpose: {name}.")


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
}
