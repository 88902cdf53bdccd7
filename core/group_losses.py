"""What the ``grpo`` stage's losses share: importance weights, the KL penalty, the entropy mask, the normalisers.

A loss of the GRPO family is a short file of math: it turns the importance
weights and the advantages into a per-token policy term, and
:func:`finish` does the rest the same way for all of them, as trl 1.16's
``GRPOTrainer._compute_loss`` does::

    per_token = policy term                       (B, T), or (B, 1) with sequence-level weights
    per_token = per_token · entropy_mask          only the high-entropy tokens train (top_entropy_quantile)
    per_token = per_token + β·KL                  k3 estimator to the reference, ·weight with bias correction
    losses    = normalise(per_token, how)         one value per completion, (B,)

``normalise`` knows trl's four ways to average over tokens (``grpo``,
``bnpo``, ``dr_grpo``, ``dapo``; see ``molting.plugins.grpo_losses``). The
entropy mask is made by the stage (:func:`high_entropy_mask`) and handed to
the loss in :attr:`molting.GroupInputs.entropy_mask`; a loss that goes
through :func:`finish` honours it without a line of its own.

torch is imported inside the functions, so a loss plugin that imports this
module stays cheap to load.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs

from molting.components import GroupInputs, LossOutput

NORMALISERS = ("grpo", "bnpo", "dr_grpo", "dapo")


@attrs.frozen
class KLParams:
    """The KL penalty every GRPO-family loss carries."""

    beta: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    """KL coefficient to the reference model; 0 (trl's default) loads no reference. DeepSeek-R1 uses 0.001."""
    use_bias_correction_kl: bool = True
    """Multiply the per-token KL by the importance weight (unbiased reverse-KL gradient), as trl 1.16 does."""


def importance_weights(inputs: GroupInputs, level: str = "token") -> Any:
    """``π/π_old``: per token ``(B, T)``, or per sequence ``(B, 1)`` as exp of the masked mean log-ratio (GSPO)."""
    import torch

    log_ratio = inputs.logps - inputs.old_logps
    if level == "sequence":
        mask = inputs.mask.to(log_ratio.dtype)
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    elif level != "token":
        raise ValueError(f"importance-sampling level must be 'token' or 'sequence', got {level!r}")
    return torch.exp(log_ratio)


def advantages_2d(inputs: GroupInputs) -> Any:
    """The advantages shaped to broadcast against per-token values: ``(B, 1)``, or ``(B, T)`` as given."""
    advantages = inputs.advantages
    return advantages.unsqueeze(1) if advantages.dim() == 1 else advantages


def clipped_surrogate(weights: Any, advantages: Any, epsilon: float, epsilon_high: float) -> tuple[Any, dict[str, Any]]:
    """PPO's ``-min(w·A, clip(w, 1-ε, 1+ε_high)·A)`` and trl's ``clip_ratio/*`` maps."""
    import torch

    clipped = torch.clamp(weights, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(weights * advantages, clipped * advantages)
    low = ((weights < 1 - epsilon) & (advantages < 0)).detach()
    high = ((weights > 1 + epsilon_high) & (advantages > 0)).detach()
    metrics = {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low | high}
    return per_token, metrics


def reference_kl(inputs: GroupInputs, weights: Any, params: KLParams) -> Any:
    """The k3 estimate ``π_ref/π - log(π_ref/π) - 1`` per token, times the weights with bias correction."""
    import torch

    if inputs.ref_logps is None:
        raise ValueError("beta > 0 needs the reference model's per-token log-probs (ref_logps)")
    diff = inputs.ref_logps - inputs.logps
    kl = torch.exp(diff) - diff - 1
    return kl * weights if params.use_bias_correction_kl else kl


def normalise(per_token: Any, inputs: GroupInputs, how: str) -> Any:
    """One loss per completion ``(B,)`` whose mean is the micro-batch loss, averaged over tokens as ``how`` says."""
    import torch

    mask = inputs.mask.to(per_token.dtype)
    sums = (per_token * mask).sum(dim=-1)
    rows = per_token.size(0)
    if how == "grpo":
        return sums / mask.sum(dim=-1).clamp(min=1.0)
    if how == "bnpo":
        return sums * (rows / mask.sum().clamp(min=1.0))
    if how == "dr_grpo":
        if not inputs.max_completion_length:
            raise ValueError("the dr_grpo normaliser needs max_completion_length (its constant)")
        return sums / inputs.max_completion_length
    if how == "dapo":
        if inputs.num_items_in_batch is None:
            raise ValueError("the dapo normaliser needs num_items_in_batch (the generation batch's completion tokens)")
        total = torch.as_tensor(inputs.num_items_in_batch, dtype=sums.dtype, device=sums.device).clamp(min=1.0)
        return sums * (rows / (total / inputs.num_processes / inputs.steps_per_generation))
    raise ValueError(f"normaliser must be one of {', '.join(NORMALISERS)}, got {how!r}")


def finish(per_token: Any, inputs: GroupInputs, params: KLParams, weights: Any, how: str,
           metrics: dict[str, Any] | None = None) -> LossOutput:
    """Entropy mask, β·KL and the normaliser applied to a policy term: the loss's :class:`LossOutput`.

    ``metrics`` maps of shape ``(B, T)`` are averaged over the completion
    tokens by the stage; ``(B, 1)`` ones (sequence-level weights) become
    ``(B,)``, averaged over completions, as trl does.
    """
    shown = {name: _metric(value, per_token) for name, value in (metrics or {}).items()}
    if inputs.entropy_mask is not None:
        per_token = per_token * inputs.entropy_mask.to(per_token.dtype)
    if params.beta != 0.0:
        kl = reference_kl(inputs, weights, params)
        per_token = per_token + params.beta * kl
        shown["kl"] = kl.detach()
    return LossOutput(losses=normalise(per_token, inputs, how), metrics=shown)


def _metric(value: Any, like: Any) -> Any:
    value = value.detach().to(like.dtype)
    return value.squeeze(1) if value.dim() == 2 and value.size(1) == 1 else value


def high_entropy_mask(entropies: Any, mask: Any, quantile: float, gather: Callable[[Any], Any] | None = None) -> Any:
    """1 on the completion tokens whose entropy is in the top ``quantile`` of every process's tokens, else 0.

    trl's ``get_high_entropy_mask`` (Wang et al., 2025, "Beyond the 80/20
    rule", arXiv:2506.01939): the threshold is the ``1 - quantile`` quantile
    of the entropies of all completion tokens of the micro-batch on all
    processes; ``gather`` (with padding: each process holds a different
    count) collects them, ``None`` on one process.
    """
    import torch

    local = entropies[mask.bool()].float()
    every = gather(local) if gather is not None else local
    if every.numel() == 0:
        return torch.zeros_like(mask, dtype=entropies.dtype)
    threshold = torch.quantile(every, 1 - quantile)
    return ((entropies * mask.to(entropies.dtype) >= threshold) & mask.bool()).to(entropies.dtype)
