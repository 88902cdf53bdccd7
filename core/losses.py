"""Small helpers shared by the preference losses (DPO and its family in ``molting.plugins``).

Hyperparameter classes and tensor helpers; torch is imported only inside the
functions that need it, so a loss plugin that uses them stays cheap to import.
"""

from __future__ import annotations

from typing import Any

import attrs

from molting.components import LossOutput, PreferenceInputs


def check_output(out: Any, loss: str, batch: int, reward_shapes: dict[str, tuple[int, ...]] | None = None) -> Any:
    """``out`` when a stage can train on it, else a :class:`~molting.errors.PluginError` naming ``loss``.

    A :class:`LossOutput` whose ``losses`` hold one floating-point value per
    example (``(batch,)``) and whose rewards, when given, have the shapes in
    ``reward_shapes``: what the conformance suite's ``output-shapes`` check
    asks, checked on every batch of a run (a shape test, no device sync).
    """
    from molting.errors import PluginError

    if not isinstance(out, LossOutput):
        raise PluginError(f"loss {loss!r} returned {type(out).__name__}; expected a molting.LossOutput")
    shape = tuple(out.losses.shape) if hasattr(out.losses, "shape") else None
    if shape != (batch,):
        raise PluginError(f"loss {loss!r}: losses has shape {shape} for a batch of {batch}; expected ({batch},). "
                          "Return one loss per example (the stage averages them); do not reduce inside the loss.")
    if not out.losses.is_floating_point():
        raise PluginError(f"loss {loss!r}: losses has dtype {out.losses.dtype}; expected a floating-point dtype")
    for name, expected in (reward_shapes or {}).items():
        value = getattr(out, name)
        if value is not None and tuple(value.shape) != expected:
            raise PluginError(f"loss {loss!r}: {name} has shape {tuple(value.shape)}; expected {expected} or None")
    return out


@attrs.frozen
class BetaParams:
    """Hyperparameters of a loss whose only knob is β."""

    beta: float = attrs.field(default=0.1, validator=attrs.validators.gt(0))
    """Strength of the KL regularisation to the reference; 0.1-0.5 is usual."""


def _label_smoothing_below_half(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0 <= value < 0.5:
        raise ValueError(
            f"label_smoothing must lie in [0, 0.5), got {value!r}: it is the assumed probability that a preference "
            "label is flipped, and at 0.5 the labels carry no information"
        )


@attrs.frozen
class LabelSmoothingParams(BetaParams):
    """β and a label-flip probability ε, for the losses that smooth the sigmoid loss with it."""

    label_smoothing: float = attrs.field(default=0.0, validator=_label_smoothing_below_half)
    """Assumed probability that a preference label is flipped, in [0, 0.5); 0 trusts every label."""


def logratios(inputs: PreferenceInputs) -> tuple[Any, Any]:
    """``(log π(y_w|x)/π_ref(y_w|x), log π(y_l|x)/π_ref(y_l|x))``, one entry per pair."""
    if inputs.ref_chosen_logps is None or inputs.ref_rejected_logps is None:
        raise ValueError("this loss needs the reference model's log-probs (ref_chosen_logps, ref_rejected_logps)")
    return inputs.chosen_logps - inputs.ref_chosen_logps, inputs.rejected_logps - inputs.ref_rejected_logps


def per_token(values: Any, lengths: Any) -> Any:
    """``values`` divided by the completion token counts (at least 1), as trl length-normalises."""
    if lengths is None:
        raise ValueError("this loss needs the completion token counts (chosen_lengths, rejected_lengths)")
    return values / lengths.clamp(min=1)


def chosen_nll(inputs: PreferenceInputs) -> Any:
    """The mean negative log-likelihood over every chosen token of the batch (a scalar, as trl computes it)."""
    if inputs.chosen_token_logps is None or inputs.chosen_mask is None:
        raise ValueError("this loss needs the chosen tokens' log-probs (chosen_token_logps, chosen_mask)")
    return -inputs.chosen_token_logps[inputs.chosen_mask.bool()].mean()


def smoothed_sigmoid(logits: Any, label_smoothing: float) -> Any:
    """``-(1-ε)·log σ(z) - ε·log σ(-z)``: the (conservative) DPO loss of a logit."""
    import torch.nn.functional as F

    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def rewards(beta: float, chosen_logratios: Any, rejected_logratios: Any) -> tuple[Any, Any]:
    """The implicit rewards ``β·log π/π_ref`` of each completion, detached (what trl logs as ``rewards/*``)."""
    return beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def output(losses: Any, beta: float, chosen_logratios: Any, rejected_logratios: Any) -> LossOutput:
    """A :class:`LossOutput` with ``losses`` and the implicit rewards of :func:`rewards`."""
    chosen_rewards, rejected_rewards = rewards(beta, chosen_logratios, rejected_logratios)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)


def combine(parts: list[tuple[Any, float]]) -> Any:
    """One :class:`~molting.Loss` that is the weighted sum of several losses of the same stage.

    ``parts`` is a list of ``(loss, weight)``. The combined hyperparameters
    are the union of the parts' fields (a shared name such as ``beta`` is one
    knob for all of them, as in trl); the implicit rewards are the first
    part's that has any; each part's mean loss is logged as ``loss/NAME``.
    This is how the MPO recipe (sigmoid 0.8 + bco_pair 0.2 + sft 1.0) runs.
    """
    from molting.components import Loss

    stages = {loss.stage for loss, _ in parts}
    if len(stages) != 1:
        from molting.errors import ConfigError

        listing = ", ".join(f"{loss.name} (stage {loss.stage})" for loss, _ in parts)
        raise ConfigError(f"combined losses must run in the same stage; got {listing}")
    fields: dict[str, Any] = {}
    for loss, _ in parts:
        for field in attrs.fields(loss.params):
            fields.setdefault(field.name, attrs.field(default=field.default, validator=field.validator))
    params_class = attrs.make_class("CombinedParams", fields, frozen=True)

    def compute(inputs: PreferenceInputs, params: Any) -> LossOutput:
        total, chosen_rewards, rejected_rewards, metrics = 0.0, None, None, {}
        for loss, weight in parts:
            own = loss.params(**{f.name: getattr(params, f.name) for f in attrs.fields(loss.params)})
            out = loss.compute(inputs, own)
            total = total + weight * out.losses
            metrics[f"loss/{loss.name}"] = out.losses.mean().detach()
            if chosen_rewards is None and out.chosen_rewards is not None:
                chosen_rewards, rejected_rewards = out.chosen_rewards, out.rejected_rewards
        return LossOutput(losses=total, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, metrics=metrics)

    return Loss(
        name="_".join(loss.name for loss, _ in parts),  # a well-formed name: dpo_bco_pair_sft
        compute=compute,
        description="Weighted sum: " + " + ".join(f"{weight:g}·{loss.name}" for loss, weight in parts),
        params=params_class,
        stage=stages.pop(),
        needs_reference=any(loss.needs_reference for loss, _ in parts),
    )

