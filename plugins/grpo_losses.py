"""The GRPO family of losses: one clipped surrogate, four ways to average it (trl's ``loss_type``).

Every variant computes, for each completion token t of completion i,

    r_it   = π(y_it | ·) / π_old(y_it | ·)                         (importance ratio)
    ℓ_it   = -min(r_it·A_i, clip(r_it, 1 - ε, 1 + ε_high)·A_i) + β·KL_it
    KL_it  = [π_ref/π - log(π_ref/π) - 1] (·r_it with use_bias_correction_kl)   (k3 estimator)

with A_i the completion's group-relative advantage (DeepSeekMath, arXiv:2402.03300)
and differs only in how the ℓ_it are averaged over the M_i tokens of each of the
B completions of a micro-batch:

    grpo     (1/B)·Σ_i (1/M_i)·Σ_t ℓ_it          per-sequence mean, then mean over sequences
    bnpo     Σ_i Σ_t ℓ_it / Σ_i M_i              mean over the micro-batch's tokens
    dr_grpo  Σ_i Σ_t ℓ_it / (B·L)                L = max_completion_length (Dr. GRPO, arXiv:2503.20783)
    dapo     Σ_i Σ_t ℓ_it / (N / P / S)          N = tokens of the whole generation batch on all P
                                                 processes, S = steps per generation (DAPO, arXiv:2503.14476)

exactly as ``GRPOTrainer._compute_loss`` of trl 1.16. Each returns one value
per completion (``LossOutput.losses``, shape ``(B,)``) whose mean is that
micro-batch loss: for the token-normalised variants row i carries its token
sum times B over the normaliser. The trainer divides by the gradient
accumulation steps, as for every stage. ``metrics`` holds per-token maps
(shape ``(B, T)``: ``kl``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
``clip_ratio/region_mean``) that the stage averages over the completion tokens
of every process, as trl does.
"""

from __future__ import annotations

from typing import Any

import attrs

import molting
from molting.components import GroupInputs, Loss, LossOutput


def _optional_positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{attribute.name} must be a number > 0 or null (the same as epsilon), got {value!r}")


@attrs.frozen
class GRPOLossParams:
    beta: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    """KL coefficient to the reference model; 0 (trl's default) loads no reference. DeepSeek-R1 uses 0.001."""
    epsilon: float = attrs.field(default=0.2, validator=attrs.validators.gt(0))
    """Lower clipping bound of the importance ratio: 1 - epsilon."""
    epsilon_high: float | None = attrs.field(default=None, validator=_optional_positive)
    """Upper clipping bound 1 + epsilon_high; null: the same as epsilon. DAPO recommends 0.28."""
    use_bias_correction_kl: bool = True
    """Multiply the per-token KL by the importance ratio (unbiased reverse-KL gradient), as trl 1.16 does by default."""


def per_token_losses(inputs: GroupInputs, params: GRPOLossParams) -> tuple[Any, dict[str, Any]]:
    """``(ℓ, metrics)``: the clipped surrogate plus β·KL per token ``(B, T)``, and per-token metric maps."""
    import torch

    advantages = inputs.advantages
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    epsilon_high = params.epsilon if params.epsilon_high is None else params.epsilon_high
    coef_1 = torch.exp(inputs.logps - inputs.old_logps)
    coef_2 = torch.clamp(coef_1, 1 - params.epsilon, 1 + epsilon_high)
    losses = -torch.min(coef_1 * advantages, coef_2 * advantages)
    low = ((coef_1 < 1 - params.epsilon) & (advantages < 0)).detach()
    high = ((coef_1 > 1 + epsilon_high) & (advantages > 0)).detach()
    metrics: dict[str, Any] = {
        "clip_ratio/low_mean": low.float(),
        "clip_ratio/high_mean": high.float(),
        "clip_ratio/region_mean": (low | high).float(),
    }
    if params.beta != 0.0:
        if inputs.ref_logps is None:
            raise ValueError("beta > 0 needs the reference model's per-token log-probs (ref_logps)")
        diff = inputs.ref_logps - inputs.logps
        kl = torch.exp(diff) - diff - 1
        if params.use_bias_correction_kl:
            kl = kl * coef_1
        losses = losses + params.beta * kl
        metrics["kl"] = kl.detach()
    return losses, metrics


def _masked_row_sums(losses: Any, mask: Any) -> Any:
    return (losses * mask).sum(dim=-1)


def grpo_loss(inputs: GroupInputs, params: GRPOLossParams) -> LossOutput:
    losses, metrics = per_token_losses(inputs, params)
    mask = inputs.mask.to(losses.dtype)
    return LossOutput(losses=_masked_row_sums(losses, mask) / mask.sum(dim=-1).clamp(min=1.0), metrics=metrics)


def bnpo_loss(inputs: GroupInputs, params: GRPOLossParams) -> LossOutput:
    losses, metrics = per_token_losses(inputs, params)
    mask = inputs.mask.to(losses.dtype)
    scale = losses.size(0) / mask.sum().clamp(min=1.0)
    return LossOutput(losses=_masked_row_sums(losses, mask) * scale, metrics=metrics)


def dr_grpo_loss(inputs: GroupInputs, params: GRPOLossParams) -> LossOutput:
    if not inputs.max_completion_length:
        raise ValueError("the dr_grpo loss needs max_completion_length (its constant normaliser)")
    losses, metrics = per_token_losses(inputs, params)
    mask = inputs.mask.to(losses.dtype)
    return LossOutput(losses=_masked_row_sums(losses, mask) / inputs.max_completion_length, metrics=metrics)


def dapo_loss(inputs: GroupInputs, params: GRPOLossParams) -> LossOutput:
    import torch

    if inputs.num_items_in_batch is None:
        raise ValueError("the dapo loss needs num_items_in_batch (the generation batch's completion tokens)")
    losses, metrics = per_token_losses(inputs, params)
    mask = inputs.mask.to(losses.dtype)
    total = torch.as_tensor(inputs.num_items_in_batch, dtype=losses.dtype, device=losses.device).clamp(min=1.0)
    per_micro_batch = total / inputs.num_processes / inputs.steps_per_generation
    return LossOutput(losses=_masked_row_sums(losses, mask) * (losses.size(0) / per_micro_batch), metrics=metrics)


VARIANTS = (
    ("grpo", grpo_loss, "GRPO: clipped importance-ratio surrogate on group-relative advantages, mean per completion."),
    ("bnpo", bnpo_loss, "GRPO surrogate averaged over the micro-batch's completion tokens (BNPO)."),
    ("dr_grpo", dr_grpo_loss, "Dr. GRPO: GRPO surrogate summed over tokens over a constant (batch x max_new_tokens)."),
    ("dapo", dapo_loss, "DAPO: GRPO surrogate averaged over the completion tokens of the whole generation batch."),
)


@molting.hookimpl
def molting_register_losses(register):
    for name, compute, description in VARIANTS:
        register(Loss(name=name, compute=compute, description=description, params=GRPOLossParams, stage="grpo",
                      needs_reference=False))
