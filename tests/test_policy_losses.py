"""GSPO, CISPO, SAPO and the entropy mask equal trl's ``GRPOTrainer._compute_loss`` on the very same tensors.

The trl stand-in of ``test_grpo_losses`` runs trl's own loss code on the
log-probs, old log-probs, reference log-probs, advantages, masks and
entropies that molting's loss plugins get; losses, gradients with respect
to the log-probs, and trl's metrics agree within 1e-6.
"""

from __future__ import annotations

import attrs
import pytest
import torch

from molting.components import GroupInputs
from molting.discovery import load_plugins
from molting.group_losses import high_entropy_mask

from test_grpo_losses import MAX_COMPLETION_LENGTH, make_batch, trl_loss

# molting loss -> (trl's loss_type, trl's extra settings)
TRL = {
    "gspo": ("grpo", {"level": "sequence"}),
    "cispo": ("cispo", {}),
    "sapo": ("sapo", {}),
}
HOST = load_plugins()


def molting_loss(name, logps, old_logps, ref_logps, advantages, mask, num_items, settings, accumulation=1,
                 entropies=None, quantile=1.0):
    loss = HOST.get("loss", name)
    fields = {f.name for f in attrs.fields(loss.params)}
    params = loss.params(**{k: v for k, v in settings.items() if k in fields})
    token_logps = logps.clone().requires_grad_(True)
    entropy_mask = high_entropy_mask(entropies, mask, quantile) if quantile < 1.0 else None
    inputs = GroupInputs(
        logps=token_logps, old_logps=old_logps, advantages=advantages, mask=mask.float(),
        ref_logps=ref_logps if params.beta else None, max_completion_length=MAX_COMPLETION_LENGTH,
        num_items_in_batch=num_items, steps_per_generation=accumulation, entropy_mask=entropy_mask,
    )
    out = loss.compute(inputs, params)
    assert out.losses.shape == (logps.size(0),)
    value = out.losses.mean() / accumulation
    value.backward()
    metrics = {}
    for key, v in out.metrics.items():  # as the stage records them: maps over tokens, vectors over completions
        metrics[key] = ((v * mask).sum() / mask.sum()).item() if v.shape == mask.shape else v.mean().item()
    return value.detach(), token_logps.grad, metrics


def trl_settings(name: str, settings: dict) -> dict:
    """molting's parameter names as trl's arguments."""
    loss_type, extra = TRL.get(name, (name, {}))
    out = {"beta": settings.get("beta", 0.0), **extra}
    params = HOST.get("loss", name).params(**{k: v for k, v in settings.items()
                                               if k in {f.name for f in attrs.fields(HOST.get("loss", name).params)}})
    if hasattr(params, "epsilon"):
        out["epsilon"] = params.epsilon
    if hasattr(params, "epsilon_high"):
        out["epsilon_high"] = params.epsilon_high
    if hasattr(params, "temperature_pos"):
        out["sapo"] = (params.temperature_pos, params.temperature_neg)
    out["bias_correction"] = params.use_bias_correction_kl
    return loss_type, out


CASES = [
    dict(),
    dict(beta=0.04),
    dict(beta=0.1, use_bias_correction_kl=False),
    dict(epsilon=0.1, epsilon_high=0.3),  # gspo with a range wide enough that some sequences pass unclipped
    dict(epsilon_high=1.2),  # cispo: caps many of the weights
    dict(temperature_pos=0.5, temperature_neg=2.0, beta=0.02),  # sapo's temperatures
]
METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio", "kl")


def _agree(name, case, seed, accumulation=1, quantile=1.0):
    logps, old_logps, ref_logps, advantages, mask = make_batch(seed)
    entropies = torch.rand(logps.shape, generator=torch.Generator().manual_seed(seed + 100)) * 3
    num_items = mask.sum() * accumulation + 3
    loss_type, theirs_settings = trl_settings(name, case)
    ours, our_grad, our_metrics = molting_loss(name, logps, old_logps, ref_logps, advantages, mask, num_items, case,
                                               accumulation, entropies, quantile)
    theirs, their_grad, their_metrics = trl_loss(loss_type, logps, old_logps, ref_logps, advantages, mask, num_items,
                                                 accumulation=accumulation, entropies=entropies, quantile=quantile,
                                                 **theirs_settings)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    torch.testing.assert_close(our_grad, their_grad, atol=1e-6, rtol=0)
    for metric in METRICS:
        if metric in their_metrics or metric in our_metrics:
            assert our_metrics[metric] == pytest.approx(their_metrics[metric], abs=1e-6), metric
    return our_grad


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
@pytest.mark.parametrize("name", sorted(TRL))
def test_loss_gradient_and_metrics_equal_trl(name, case):
    for seed in range(3):
        _agree(name, case, seed)


@pytest.mark.parametrize("name", sorted(TRL))
def test_accumulation_normalises_as_trl(name):
    _agree(name, dict(beta=0.04), seed=5, accumulation=2)


@pytest.mark.parametrize("name", ["grpo", "bnpo", "dr_grpo", "dapo", *sorted(TRL)])
@pytest.mark.parametrize("quantile", [0.2, 0.5])
def test_entropy_mask_equals_trl_and_silences_low_entropy_tokens(name, quantile):
    grad = _agree(name, dict(beta=0.0), seed=3, quantile=quantile)
    logps, _, _, _, mask = make_batch(3)
    entropies = torch.rand(logps.shape, generator=torch.Generator().manual_seed(103)) * 3
    kept = high_entropy_mask(entropies, mask, quantile)
    if name != "gspo":  # a sequence weight passes every token's gradient to the kept tokens' loss
        assert (grad[kept == 0] == 0).all() and (grad[kept == 1] != 0).any()
    share = kept.sum() / mask.sum()
    assert quantile - 0.15 <= share.item() <= quantile + 0.15


def test_gspo_weights_are_one_per_sequence():
    """Every token of a completion shares its sequence weight: the gradient of a token depends on its row only."""
    logps, old_logps, _, advantages, mask = make_batch(1)
    inputs = GroupInputs(logps=logps, old_logps=old_logps, advantages=advantages, mask=mask.float())
    from molting.group_losses import importance_weights

    weights = importance_weights(inputs, "sequence")
    assert weights.shape == (logps.size(0), 1)
    row = 0
    expected = torch.exp(((logps - old_logps)[row] * mask[row]).sum() / mask[row].sum())
    assert weights[row, 0].item() == pytest.approx(expected.item(), rel=1e-6)


def test_cispo_keeps_a_gradient_where_grpo_clips():
    """A token far above the clip range: GRPO's gradient there is 0, CISPO's is the capped weight times A."""
    logps = torch.full((1, 3), -1.0, requires_grad=True)
    old = torch.tensor([[-1.0, -2.0, -1.0]])  # ratio e on the middle token
    inputs = dict(old_logps=old, advantages=torch.tensor([1.0]), mask=torch.ones(1, 3), num_items_in_batch=3)
    grpo, cispo = HOST.get("loss", "grpo"), HOST.get("loss", "cispo")
    grpo.compute(GroupInputs(logps=logps, **inputs), grpo.params()).losses.sum().backward()
    assert logps.grad[0, 1] == 0
    logps.grad = None
    cispo.compute(GroupInputs(logps=logps, **inputs), cispo.params()).losses.sum().backward()
    assert logps.grad[0, 1].item() == pytest.approx(-torch.e / 3, rel=1e-6)


def test_sapo_gate_is_smooth_and_one_at_ratio_one():
    """SAPO's gradient is the importance-weighted policy gradient r·A·∇log π times a gate 4σ'(τ(r-1)): 1 on-policy,
    shrinking smoothly as r leaves 1, never the cliff of a hard clip."""
    sapo = HOST.get("loss", "sapo")
    grads = []
    for shift in (0.0, 0.5, 1.0, 2.0):
        logps = torch.full((1, 1), -1.0, requires_grad=True)
        inputs = GroupInputs(logps=logps, old_logps=torch.full((1, 1), -1.0 - shift), advantages=torch.tensor([1.0]),
                             mask=torch.ones(1, 1))
        sapo.compute(inputs, sapo.params()).losses.sum().backward()
        grads.append(-logps.grad.item() / torch.exp(torch.tensor(shift)).item())  # the gate: gradient / (r·A)
    assert grads[0] == pytest.approx(1.0, rel=1e-6)  # d/dlogp of -σ(τ(r-1))·4/τ at r=1 is -1
    assert all(a > b > 0 for a, b in zip(grads, grads[1:]))
