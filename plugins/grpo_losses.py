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
from molting.group_losses import KLParams, advantages_2d, clipped_surrogate, finish, importance_weights


def _optional_positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{attribute.name} must be a number > 0 or null (the same as epsilon), got {value!r}")


@attrs.frozen
class GRPOLossParams(KLParams):
    epsilon: float = attrs.field(default=0.2, validator=attrs.validators.gt(0))
    """Lower clipping bound of the importance ratio: 1 - epsilon."""
    epsilon_high: float | None = attrs.field(default=None, validator=_optional_positive)
    """Upper clipping bound 1 + epsilon_high; null: the same as epsilon. DAPO recommends 0.28."""


def per_token_losses(inputs: GroupInputs, params: GRPOLossParams) -> tuple[Any, dict[str, Any]]:
    """``(ℓ, metrics)``: the clipped surrogate per token ``(B, T)`` (no KL yet), and the clip-ratio maps."""
    return _surrogate(importance_weights(inputs), inputs, params)


def _surrogate(weights: Any, inputs: GroupInputs, params: GRPOLossParams) -> tuple[Any, dict[str, Any]]:
    epsilon_high = params.epsilon if params.epsilon_high is None else params.epsilon_high
    return clipped_surrogate(weights, advantages_2d(inputs), params.epsilon, epsilon_high)


def _variant(how: str):
    def compute(inputs: GroupInputs, params: GRPOLossParams) -> LossOutput:
        weights = importance_weights(inputs)
        losses, metrics = _surrogate(weights, inputs, params)
        return finish(losses, inputs, params, weights, how, metrics)

    compute.__name__ = compute.__qualname__ = f"{how}_loss"
    return compute


grpo_loss, bnpo_loss, dr_grpo_loss, dapo_loss = (_variant(how) for how in ("grpo", "bnpo", "dr_grpo", "dapo"))

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
