"""ORPO and CPO: reference-free preference losses equal to trl's ORPOTrainer and CPOTrainer on the same tensors.

trl's loss methods (``odds_ratio_loss``, ``cpo_loss``) run, unchanged, on a
stand-in ``self`` with the settings they read; the NLL term is trl's cross
entropy over the chosen tokens, the mean of their negative log-probs. The
batch loss (as trl assembles it: ``nll - losses.mean()`` for ORPO,
``losses.mean() + cpo_alpha·nll`` for CPO), its gradients with respect to
every log-prob, the implicit rewards and the logged metrics agree within 1e-6.
A run loads no reference model for either.
"""

from __future__ import annotations

import json
import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from conftest import run_molting
from molting.components import PreferenceInputs
from molting.discovery import load_plugins

HOST = load_plugins()


def batch(seed: int, n: int = 8, width: int = 12, scale: float = 1.5):
    """Per-token chosen/rejected log-probs (ragged masks); summed log-probs and lengths follow from them."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (2, n), generator=g)
    masks = [(torch.arange(width)[None, :] < lengths[i][:, None]).float() for i in range(2)]
    tokens = [-scale * torch.rand(n, width, generator=g) * m for m in masks]
    return tokens, masks, lengths.float()


def molting_side(name: str, tokens, masks, lengths, **settings):
    chosen_tokens = tokens[0].clone().requires_grad_(True)
    rejected_tokens = tokens[1].clone().requires_grad_(True)
    inputs = PreferenceInputs(
        chosen_logps=(chosen_tokens * masks[0]).sum(1), rejected_logps=(rejected_tokens * masks[1]).sum(1),
        chosen_lengths=lengths[0], rejected_lengths=lengths[1], chosen_token_logps=chosen_tokens, chosen_mask=masks[0])
    loss = HOST.get("loss", name)
    out = loss.compute(inputs, loss.params(**settings))
    assert out.losses.shape == (tokens[0].size(0),)
    total = out.losses.mean()
    total.backward()
    return total.detach(), chosen_tokens.grad, rejected_tokens.grad, out


def trl_side(name: str, tokens, masks, lengths, beta=0.1, label_smoothing=0.0, cpo_alpha=1.0, loss_type="sigmoid"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer

    chosen_tokens = tokens[0].clone().requires_grad_(True)
    rejected_tokens = tokens[1].clone().requires_grad_(True)
    summed = [(chosen_tokens * masks[0]).sum(1), (rejected_tokens * masks[1]).sum(1)]
    nll = -chosen_tokens[masks[0].bool()].mean()  # trl's cross_entropy_loss over the chosen labels
    fake = SimpleNamespace(beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, alpha=0.0,
                           simpo_gamma=0.5, accelerator=SimpleNamespace(device="cpu"))
    if name == "orpo":  # trl's get_batch_logps(average_log_prob=True) for ORPO
        averaged = [summed[0] / lengths[0], summed[1] / lengths[1]]
        losses, chosen_r, rejected_r, ratio, log_odds = ORPOTrainer.odds_ratio_loss(fake, *averaged)
        total, metrics = nll - losses.mean(), {"log_odds_ratio": ratio, "log_odds_chosen": log_odds, "nll_loss": nll}
    else:  # average_log_prob only for ipo (and simpo)
        logps = [summed[0] / lengths[0], summed[1] / lengths[1]] if loss_type == "ipo" else summed
        losses, chosen_r, rejected_r = CPOTrainer.cpo_loss(fake, *logps)
        total, metrics = losses.mean() + cpo_alpha * nll, {"nll_loss": nll}
    total.backward()
    return total.detach(), chosen_tokens.grad, rejected_tokens.grad, chosen_r, rejected_r, metrics


CASES = [
    ("orpo", {}), ("orpo", {"beta": 0.5}),
    ("cpo", {}), ("cpo", {"beta": 0.3, "label_smoothing": 0.1}), ("cpo", {"cpo_alpha": 0.0}),
    ("cpo", {"loss_type": "hinge"}), ("cpo", {"loss_type": "ipo", "cpo_alpha": 0.5}),
]


@pytest.mark.parametrize(("name", "settings"), CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_loss_gradients_rewards_and_metrics_equal_trl(name, settings):
    for seed in range(3):
        tokens, masks, lengths = batch(seed)
        ours, our_chosen, our_rejected, out = molting_side(name, tokens, masks, lengths, **settings)
        theirs, their_chosen, their_rejected, chosen_r, rejected_r, metrics = trl_side(name, tokens, masks, lengths,
                                                                                      **settings)
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-6, rel=1e-7)  # IPO's square is 26: float32 ulps
        torch.testing.assert_close(our_chosen, their_chosen, atol=1e-6, rtol=0)
        torch.testing.assert_close(our_rejected, their_rejected, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.chosen_rewards, chosen_r.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(out.rejected_rewards, rejected_r.detach(), atol=1e-6, rtol=0)
        for metric, value in metrics.items():
            if metric in out.metrics or settings.get("cpo_alpha", 1.0):
                assert out.metrics[metric].item() == pytest.approx(value.item(), abs=1e-6), metric


def test_orpo_is_finite_where_a_completion_is_almost_certain():
    """log(1 − p) as p → 1 (average log-prob → 0): the stable branch keeps loss and gradient finite."""
    tokens = [torch.full((2, 3), -1e-7), torch.full((2, 3), -2.0)]
    masks = [torch.ones(2, 3), torch.ones(2, 3)]
    loss, chosen_grad, _, _ = molting_side("orpo", tokens, masks, torch.full((2, 2), 3.0))
    assert math.isfinite(loss.item()) and torch.isfinite(chosen_grad).all()


@pytest.mark.parametrize("name", ["orpo", "cpo"])
def test_a_run_loads_no_reference_and_logs_trls_names(tmp_path, name):
    out = tmp_path / name
    result = run_molting("run", "--plugin", name, "--max-steps", "2", "--logging-steps", "1", "--eval", "off",
                         "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference model: none" in result.stderr
    record = json.loads((out / "molting_run.json").read_text())
    assert (record["status"], record["stage"], record["loss"]) == ("completed", "preference", name)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps)
    assert {"nll_loss", "rewards/margins"} <= set(steps[0])
    if name == "orpo":
        assert {"log_odds_ratio", "log_odds_chosen"} <= set(steps[0])
