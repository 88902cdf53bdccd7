"""The DPO loss against its paper's formula and against trl's implementation on identical tensors."""

from __future__ import annotations

import math

import pytest
import torch

from molting.components import PreferenceInputs
from molting.plugins.dpo import DPOParams, dpo_loss
from trl_oracle import make_dpo_trainer, trl_dpo


def random_batch(seed: int, n: int = 16, scale: float = 30.0):
    g = torch.Generator().manual_seed(seed)
    logps = -scale * torch.rand(4, n, generator=g, dtype=torch.float32)
    lengths = torch.randint(1, 40, (2, n), generator=g).float()
    return (*logps, *lengths)


def inputs_of(chosen, rejected, ref_chosen, ref_rejected, chosen_len=None, rejected_len=None):
    return PreferenceInputs(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len)


@pytest.fixture(scope="module")
def trl_trainer(demo_model, tmp_path_factory):
    return make_dpo_trainer(demo_model, tmp_path_factory.mktemp("trl"))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_trl_on_identical_tensors(trl_trainer, seed, beta):
    batch = random_batch(seed)
    out = dpo_loss(inputs_of(*batch), DPOParams(beta=beta))
    trl_loss, trl_metrics = trl_dpo(trl_trainer, "sigmoid", *batch, beta=beta)
    assert abs(out.losses.mean().item() - trl_loss.item()) < 1e-6
    assert abs(out.chosen_rewards.mean().item() - trl_metrics["rewards/chosen"]) < 1e-6
    assert abs(out.rejected_rewards.mean().item() - trl_metrics["rewards/rejected"]) < 1e-6
    margins = (out.chosen_rewards - out.rejected_rewards).mean().item()
    assert abs(margins - trl_metrics["rewards/margins"]) < 1e-6
    accuracy = (out.chosen_rewards > out.rejected_rewards).float().mean().item()
    assert accuracy == trl_metrics["rewards/accuracies"]


def test_each_example_matches_trl(trl_trainer):
    batch = random_batch(3, n=6)
    out = dpo_loss(inputs_of(*batch), DPOParams(beta=0.2))
    for i in range(6):
        one = [t[i : i + 1] for t in batch]
        trl_loss, _ = trl_dpo(trl_trainer, "sigmoid", *one, beta=0.2)
        assert abs(out.losses[i].item() - trl_loss.item()) < 1e-6


def test_extreme_log_probs_match_trl_and_stay_finite(trl_trainer):
    big = torch.tensor([-1e4, -1e4, -1.0, 0.0])
    small = torch.tensor([0.0, -1.0, -1e4, -1e4])
    lengths = torch.tensor([1.0, 5.0, 50.0, 500.0])
    batch = (big, small, small, big, lengths, lengths)
    out = dpo_loss(inputs_of(*batch), DPOParams(beta=0.5))
    assert torch.isfinite(out.losses).all()
    trl_loss, _ = trl_dpo(trl_trainer, "sigmoid", *batch, beta=0.5)
    assert abs(out.losses.mean().item() - trl_loss.item()) / max(1.0, abs(trl_loss.item())) < 1e-6


def test_matches_the_paper_formula():
    chosen, rejected, ref_chosen, ref_rejected, *_ = random_batch(7)
    beta = 0.3
    out = dpo_loss(inputs_of(chosen, rejected, ref_chosen, ref_rejected), DPOParams(beta=beta))
    for i in range(len(chosen)):
        h = (float(chosen[i]) - float(ref_chosen[i])) - (float(rejected[i]) - float(ref_rejected[i]))
        expected = -math.log(1 / (1 + math.exp(-beta * h)))
        assert out.losses[i].item() == pytest.approx(expected, abs=1e-5)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (float(chosen[i]) - float(ref_chosen[i])), abs=1e-5)


def test_label_smoothing_is_conservative_dpo():
    chosen, rejected, ref_chosen, ref_rejected, *_ = random_batch(8)
    beta, eps = 0.1, 0.2
    out = dpo_loss(inputs_of(chosen, rejected, ref_chosen, ref_rejected), DPOParams(beta=beta, label_smoothing=eps))
    for i in range(len(chosen)):
        z = beta * ((float(chosen[i]) - float(ref_chosen[i])) - (float(rejected[i]) - float(ref_rejected[i])))
        log_sig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
        expected = -(1 - eps) * log_sig(z) - eps * log_sig(-z)
        assert out.losses[i].item() == pytest.approx(expected, abs=1e-5)


def test_policy_equal_to_reference_gives_ln2():
    logps = torch.tensor([-12.5, -3.0, -40.0])
    out = dpo_loss(inputs_of(logps, logps - 1, logps, logps - 1), DPOParams())
    assert torch.allclose(out.losses, torch.full((3,), math.log(2)), atol=1e-7)


def test_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-5.0, -9.0], requires_grad=True)
    rejected = torch.tensor([-5.0, -2.0], requires_grad=True)
    out = dpo_loss(inputs_of(chosen, rejected, chosen.detach(), rejected.detach()), DPOParams())
    out.losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


@pytest.mark.parametrize("kwargs", [{"beta": 0.0}, {"beta": -1.0}, {"label_smoothing": 0.5}, {"label_smoothing": -0.1}])
def test_bad_hyperparameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        DPOParams(**kwargs)
