"""The plugin author's tests: the conformance suite, plus SimPO's own numbers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from molting.testing import LossTests, example_inputs
from molting_simpo import SimPOParams, simpo_loss


class TestSimPOConformance(LossTests):
    name = "simpo"  # looked up through the entry point, as `molting run --plugin simpo` does


def test_matches_the_paper():
    inputs = example_inputs(batch=5, reference=False)
    out = simpo_loss(inputs, SimPOParams(beta=2.0, gamma=1.0))
    for i in range(5):
        margin = 2.0 * (inputs.chosen_logps[i] / inputs.chosen_lengths[i] - inputs.rejected_logps[i] / inputs.rejected_lengths[i]) - 1.0
        assert out.losses[i].item() == pytest.approx(math.log1p(math.exp(-float(margin))), abs=1e-5)


def test_matches_trl_cpo_simpo():
    """trl's CPOTrainer.cpo_loss with loss_type="simpo", on the same length-averaged log-probs."""
    from trl.experimental.cpo import CPOTrainer

    inputs = example_inputs(batch=8, reference=False)
    beta, gamma = 2.5, 1.2
    fake_self = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                                accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(
        fake_self, inputs.chosen_logps / inputs.chosen_lengths, inputs.rejected_logps / inputs.rejected_lengths
    )
    out = simpo_loss(inputs, SimPOParams(beta=beta, gamma=gamma))
    assert torch.allclose(out.losses, trl_losses, atol=1e-6)
    assert torch.allclose(out.chosen_rewards, trl_chosen, atol=1e-6)
    assert torch.allclose(out.rejected_rewards, trl_rejected, atol=1e-6)
