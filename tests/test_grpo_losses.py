"""The GRPO losses equal trl's: ``GRPOTrainer._compute_loss`` (trl 1.16) run on the very same tensors.

trl computes its GRPO loss inside ``_compute_loss`` from the per-token
log-probs its model returns. A stand-in ``self`` (the attributes that method
reads) whose ``_get_per_token_logps_and_entropies`` returns fixed tensors
runs trl's own loss and metric code, unchanged, on the log-probs, old
log-probs, reference log-probs, advantages and masks molting's loss gets.
Losses, gradients with respect to the log-probs, and the clip-ratio and KL
metrics must agree within 1e-6.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from molting.components import GroupInputs
from molting.plugins.grpo_losses import GRPOLossParams, VARIANTS

LOSSES = {name: compute for name, compute, _ in VARIANTS}
MAX_COMPLETION_LENGTH = 12


def make_batch(seed: int = 0, batch: int = 6, width: int = 9):
    """Per-token tensors as the stage holds them: ratios far enough from 1 to clip, ragged masks, one empty row."""
    g = torch.Generator().manual_seed(seed)
    logps = -0.1 - 3 * torch.rand(batch, width, generator=g)
    old_logps = logps + 0.4 * torch.randn(batch, width, generator=g)
    ref_logps = logps + 0.5 * torch.randn(batch, width, generator=g)
    advantages = torch.randn(batch, generator=g)
    lengths = torch.randint(1, width + 1, (batch,), generator=g)
    lengths[2] = 0  # a truncated completion, masked out
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return logps, old_logps, ref_logps, advantages, mask


def trl_stand_in(loss_type: str, beta: float, epsilon: float, epsilon_high: float | None, token_logps: torch.Tensor,
                 accumulation: int = 1, num_processes: int = 1, bias_correction: bool = True, level: str = "token",
                 entropies: torch.Tensor | None = None, quantile: float = 1.0, sapo: tuple[float, float] = (1.0, 1.05)):
    """The least of a ``GRPOTrainer`` that ``_compute_loss`` reads: one process view, training mode."""
    from trl import GRPOTrainer

    accelerator = SimpleNamespace(num_processes=num_processes, gather=lambda x: x, reduce=lambda x, reduction: x,
                                  pad_across_processes=lambda x, dim, pad_index: x)
    entropies = torch.zeros_like(token_logps) if entropies is None else entropies
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (token_logps, entropies, None),
        aux_loss_enabled=False, top_entropy_quantile=quantile, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation, max_completion_length=MAX_COMPLETION_LENGTH,
        accelerator=accelerator, _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=bias_correction, delta=None, steps_per_generation=accumulation,
                             sapo_temperature_pos=sapo[0], sapo_temperature_neg=sapo[1]),
    )
    fake.get_high_entropy_mask = lambda *a: GRPOTrainer.get_high_entropy_mask(fake, *a)
    return fake


def trl_loss(loss_type, logps, old_logps, ref_logps, advantages, mask, num_items, beta=0.0, epsilon=0.2,
             epsilon_high=None, accumulation=1, num_processes=1, bias_correction=True, **extra):
    """(loss, d loss / d logps, metrics) from trl's ``GRPOTrainer._compute_loss``.

    ``extra``: ``level`` (importance sampling), ``entropies`` and ``quantile``, ``sapo`` temperatures.
    """
    from trl import GRPOTrainer

    token_logps = logps.clone().requires_grad_(True)
    fake = trl_stand_in(loss_type, beta, epsilon, epsilon_high, token_logps, accumulation, num_processes,
                        bias_correction, **extra)
    n, width = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(n, 3, dtype=torch.long), "prompt_mask": torch.ones(n, 3, dtype=torch.long),
        "completion_ids": torch.zeros(n, width, dtype=torch.long), "completion_mask": mask,
        "advantages": advantages, "old_per_token_logps": old_logps, "num_items_in_batch": num_items,
    }
    if beta:
        inputs["ref_per_token_logps"] = ref_logps
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    return loss.detach(), token_logps.grad, {k: v[-1] for k, v in fake._metrics["train"].items()}


def molting_loss(name, logps, old_logps, ref_logps, advantages, mask, num_items, beta=0.0, epsilon=0.2,
                 epsilon_high=None, accumulation=1, num_processes=1, bias_correction=True):
    """(loss as the stage applies it: the mean over completions over the accumulation steps, its gradient, metrics)."""
    token_logps = logps.clone().requires_grad_(True)
    params = GRPOLossParams(beta=beta, epsilon=epsilon, epsilon_high=epsilon_high,
                            use_bias_correction_kl=bias_correction)
    inputs = GroupInputs(
        logps=token_logps, old_logps=old_logps, advantages=advantages, mask=mask.float(),
        ref_logps=ref_logps if beta else None, max_completion_length=MAX_COMPLETION_LENGTH,
        num_items_in_batch=num_items, num_processes=num_processes, steps_per_generation=accumulation,
    )
    out = LOSSES[name](inputs, params)
    assert out.losses.shape == (logps.size(0),)
    loss = out.losses.mean() / accumulation
    loss.backward()
    metrics = {k: ((v * mask).sum() / mask.sum()).item() for k, v in out.metrics.items()}
    return loss.detach(), token_logps.grad, metrics


CASES = [
    dict(),
    dict(beta=0.04),
    dict(epsilon=0.2, epsilon_high=0.28),
    dict(beta=0.1, epsilon=0.1, epsilon_high=0.3),
    dict(beta=0.04, bias_correction=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_gradient_and_metrics_equal_trl(name, case):
    for seed in range(3):
        logps, old_logps, ref_logps, advantages, mask = make_batch(seed)
        num_items = mask.sum()
        ours, our_grad, our_metrics = molting_loss(name, logps, old_logps, ref_logps, advantages, mask, num_items, **case)
        theirs, their_grad, their_metrics = trl_loss(name, logps, old_logps, ref_logps, advantages, mask, num_items, **case)
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
        torch.testing.assert_close(our_grad, their_grad, atol=1e-6, rtol=0)
        for metric in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl"):
            if metric in their_metrics or metric in our_metrics:
                assert our_metrics[metric] == pytest.approx(their_metrics[metric], abs=1e-6), metric
        assert ("kl" in our_metrics) == bool(case.get("beta"))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_accumulation_and_processes_normalise_as_trl(name):
    """Two accumulation steps per generation batch and two processes: DAPO's normaliser spans them all."""
    logps, old_logps, ref_logps, advantages, mask = make_batch(7)
    num_items = mask.sum() * 2 + 5  # the generation batch holds other micro-batches, on other processes
    for accumulation, processes in ((2, 1), (1, 2), (4, 2)):
        case = dict(beta=0.04, accumulation=accumulation, num_processes=processes, epsilon_high=0.28)
        ours, our_grad, _ = molting_loss(name, logps, old_logps, ref_logps, advantages, mask, num_items, **case)
        theirs, their_grad, _ = trl_loss(name, logps, old_logps, ref_logps, advantages, mask, num_items, **case)
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
        torch.testing.assert_close(our_grad, their_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_on_policy_gradient_raises_better_completions(name):
    """At ratio 1 the gradient raises the log-probs of completions with a positive advantage, lowers the others."""
    logps = torch.full((4, 5), -1.0, requires_grad=True)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    inputs = GroupInputs(logps=logps, old_logps=logps.detach(), advantages=advantages, mask=torch.ones(4, 5),
                         max_completion_length=5, num_items_in_batch=torch.tensor(20.0))
    LOSSES[name](inputs, GRPOLossParams()).losses.mean().backward()
    assert (logps.grad[advantages > 0] < 0).all() and (logps.grad[advantages < 0] > 0).all()


def test_beta_without_reference_logps_is_a_clear_error():
    logps, old_logps, _, advantages, mask = make_batch()
    inputs = GroupInputs(logps=logps, old_logps=old_logps, advantages=advantages, mask=mask.float(),
                         max_completion_length=12, num_items_in_batch=mask.sum())
    with pytest.raises(ValueError, match="ref_logps"):
        LOSSES["grpo"](inputs, GRPOLossParams(beta=0.1))


@pytest.mark.parametrize("bad", [dict(beta=-0.1), dict(epsilon=0.0), dict(epsilon_high=-1.0), dict(epsilon_high="x"),
                                 dict(beta=float("nan"))])
def test_params_reject_bad_values(bad):
    with pytest.raises((ValueError, TypeError)):
        GRPOLossParams(**bad)


def test_the_four_losses_are_registered_for_the_grpo_stage():
    from molting.discovery import load_plugins

    host = load_plugins()
    for name in LOSSES:
        loss = host.get("loss", name)
        assert loss.stage == "grpo" and not loss.needs_reference and loss.params is GRPOLossParams
