"""Example inputs for the numeric loss checks: one generator per inputs class.

A loss names its stage and the stage names the class it hands the loss
(``Stage.inputs``: :class:`~molting.PreferenceInputs`, :class:`~molting.UnpairedInputs`,
:class:`~molting.RewardInputs`, :class:`~molting.GroupInputs`). The checks look up the
:class:`InputsGenerator` registered for that class, which knows how to

* build a random but plausible batch (:meth:`~InputsGenerator.example`), in a
  dtype, with or without the reference model's values;
* attach gradients to the fields that carry the policy's gradient
  (:meth:`~InputsGenerator.with_gradient`);
* shuffle a batch (:meth:`~InputsGenerator.permute`): the fields whose first
  dimension is the batch are reordered, batch-level scalars stay;
* give large-magnitude and degenerate cases (:meth:`~InputsGenerator.extreme_cases`);
* give, where it applies, a "zero-margin" case and the direction training
  must move each gradient field there (:meth:`~InputsGenerator.zero_margin`).

A third-party inputs class gets the checks by registering a generator::

    from molting.testing import InputsGenerator, inputs_generator

    @inputs_generator(MyInputs)
    class MyInputsGenerator(InputsGenerator):
        gradient_fields = ("scores",)
        batch_fields = ("scores", "weights")

        def example(self, batch=6, dtype=None, seed=0, reference=True):
            ...

Without one, the numeric checks of its losses are skipped with that reason.
Everything here imports torch only when it builds tensors.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import attrs

from molting.components import GroupInputs, PreferenceInputs, RewardInputs, UnpairedInputs


@attrs.frozen
class Expectation:
    """One claim of the ``gradient-direction`` check about ``d loss / d field`` at the zero-margin case.

    ``sign`` is the way training (descending the loss) must move the selected
    entries: ``+1`` raise them (gradient < 0), ``-1`` lower them (gradient > 0),
    ``0`` leave them alone (gradient exactly 0, e.g. padding). ``where`` is a
    bool tensor of the field's shape selecting the entries the claim is about
    (``None``: all of them); ``what`` names what the movement means, for the
    message ("the chosen response's probability"); ``examples`` qualifies the
    field in the message (" of the desirable examples").
    """

    field: str
    sign: int
    what: str
    where: Any = None
    examples: str = ""


@attrs.frozen
class ZeroMargin:
    """Inputs at which the loss has no preference yet, and what its gradient must do there."""

    inputs: Any
    expectations: tuple[Expectation, ...]
    condition: str = "at zero margin"


class InputsGenerator:
    """Builds example inputs of one inputs class for the numeric loss checks; subclass it per class.

    ``gradient_fields`` are the fields that carry the policy's (or the reward
    model's) gradient; ``batch_fields`` those whose first dimension is the
    batch. A subclass must implement :meth:`example`; the other methods have
    defaults that follow from the two tuples.
    """

    inputs_class: ClassVar[type | None] = None
    gradient_fields: ClassVar[tuple[str, ...]] = ()
    batch_fields: ClassVar[tuple[str, ...]] = ()

    def example(self, batch: int = 6, dtype: Any = None, seed: int = 0, reference: bool = True) -> Any:
        """A random but plausible batch of ``batch`` examples in ``dtype`` (float32 by default);
        ``reference=False`` leaves out the reference model's values (``Loss.needs_reference``)."""
        raise NotImplementedError

    def with_gradient(self, inputs: Any) -> tuple[Any, dict[str, Any]]:
        """``inputs`` with fresh leaf tensors (``requires_grad``) for the gradient fields, and those leaves by name."""
        leaves = {
            name: getattr(inputs, name).detach().clone().requires_grad_(True)
            for name in self.gradient_fields
            if getattr(inputs, name) is not None
        }
        return attrs.evolve(inputs, **leaves), leaves

    def permute(self, inputs: Any, order: Any) -> Any:
        """The batch reordered by ``order``: every batch field is indexed, everything else is kept."""
        return attrs.evolve(
            inputs, **{name: getattr(inputs, name)[order] for name in self.batch_fields if getattr(inputs, name) is not None}
        )

    def batch_size(self, inputs: Any) -> int:
        return int(getattr(inputs, self.batch_fields[0]).shape[0])

    def reward_shapes(self, inputs: Any) -> dict[str, tuple[tuple[int, ...], str]]:
        """The expected shape of ``LossOutput.chosen_rewards`` / ``rejected_rewards`` (when not None), and a note."""
        size = self.batch_size(inputs)
        return {"chosen_rewards": ((size,), ""), "rejected_rewards": ((size,), "")}

    def extreme_cases(self, reference: bool = True) -> dict[str, Any]:
        """Named inputs on which losses and gradients must stay finite; by default just a batch of 1."""
        return {"a batch of 1": self.example(batch=1, reference=reference)}

    def zero_margin(self, reference: bool = True) -> ZeroMargin | None:
        """Inputs with no margin yet and the gradient's expected direction, or ``None`` (the check is skipped)."""
        return None


GENERATORS: dict[type, InputsGenerator] = {}
"""The registry: inputs class → its generator (exact class, not subclasses: a subclass has fields of its own)."""


def inputs_generator(inputs_class: type) -> Callable[[Any], Any]:
    """Register a generator (an :class:`InputsGenerator` subclass or instance) for ``inputs_class``.

    A later registration for the same class replaces the earlier one. Register
    where the checks will see it: in the plugin module that defines the stage
    (``molting check`` imports it) or in a ``conftest.py``.
    """

    def decorate(generator: Any) -> Any:
        instance = generator() if isinstance(generator, type) else generator
        if not isinstance(instance, InputsGenerator):
            raise TypeError(f"inputs_generator({inputs_class.__name__}) expects an InputsGenerator, got {generator!r}")
        instance.inputs_class = inputs_class
        GENERATORS[inputs_class] = instance
        return generator

    return decorate


def generator_for(inputs_class: type | None) -> InputsGenerator | None:
    """The generator registered for ``inputs_class``, or ``None``."""
    return GENERATORS.get(inputs_class) if inputs_class is not None else None


def example_inputs_for(inputs_class: type, batch: int = 6, dtype: Any = None, seed: int = 0,
                       reference: bool = True) -> Any:
    """A random but plausible batch of ``inputs_class`` from its registered generator."""
    generator = generator_for(inputs_class)
    if generator is None:
        raise LookupError(
            f"no example-input generator for {inputs_class.__module__}.{inputs_class.__qualname__}; "
            "register one with @molting.testing.inputs_generator"
        )
    return generator.example(batch=batch, dtype=dtype, seed=seed, reference=reference)


def _mask(lengths: Any, width: int | None = None) -> Any:
    import torch

    width = int(lengths.max()) if width is None else width
    return (torch.arange(width)[None, :] < lengths[:, None]).float()


# --------------------------------------------------------------------------- preference


def example_inputs(batch: int = 6, dtype: Any = None, seed: int = 0, reference: bool = True) -> PreferenceInputs:
    """Random but plausible inputs of the preference stage: log-probs in [-60, -1], 3-30 tokens."""
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(seed)
    logps = -1 - 59 * torch.rand(4, batch, generator=g)
    lengths = torch.randint(3, 31, (2, batch), generator=g)
    mask = _mask(lengths[0])
    return PreferenceInputs(
        chosen_logps=logps[0].to(dtype),
        rejected_logps=logps[1].to(dtype),
        ref_chosen_logps=logps[2].to(dtype) if reference else None,
        ref_rejected_logps=logps[3].to(dtype) if reference else None,
        chosen_lengths=lengths[0],
        rejected_lengths=lengths[1],
        chosen_token_logps=(mask * (logps[0] / lengths[0])[:, None]).to(dtype),
        chosen_mask=mask.to(dtype),
    )


def with_logps(inputs: PreferenceInputs, chosen: Any, rejected: Any, **changes: Any) -> PreferenceInputs:
    """``inputs`` with new summed log-probs; the per-token chosen log-probs are rebuilt from ``chosen``
    (spread evenly over its tokens) so that gradients reach ``chosen`` either way."""
    mask = inputs.chosen_mask
    lengths = mask.sum(dim=1).clamp(min=1)
    token_logps = mask * (chosen / lengths.to(chosen.dtype))[:, None].to(mask.dtype)
    return attrs.evolve(inputs, chosen_logps=chosen, rejected_logps=rejected, chosen_token_logps=token_logps, **changes)


@inputs_generator(PreferenceInputs)
class PreferenceInputsGenerator(InputsGenerator):
    """:class:`PreferenceInputs`: :func:`example_inputs`.

    The gradient reaches ``chosen_logps``, ``rejected_logps`` and
    ``chosen_token_logps``; the leaves are the two summed log-probs, and the
    per-token ones are rebuilt from ``chosen_logps`` (:func:`with_logps`) so a
    loss with an NLL term on the tokens sends its gradient to the same leaf.
    """

    gradient_fields = ("chosen_logps", "rejected_logps", "chosen_token_logps")
    batch_fields = tuple(f.name for f in attrs.fields(PreferenceInputs))  # every field is per pair

    def example(self, batch: int = 6, dtype: Any = None, seed: int = 0, reference: bool = True) -> PreferenceInputs:
        return example_inputs(batch=batch, dtype=dtype, seed=seed, reference=reference)

    def with_gradient(self, inputs: PreferenceInputs) -> tuple[PreferenceInputs, dict[str, Any]]:
        chosen = inputs.chosen_logps.detach().clone().requires_grad_(True)
        rejected = inputs.rejected_logps.detach().clone().requires_grad_(True)
        return with_logps(inputs, chosen, rejected), {"chosen_logps": chosen, "rejected_logps": rejected}

    def extreme_cases(self, reference: bool = True) -> dict[str, Any]:
        import torch

        base = example_inputs(batch=4, reference=reference)
        big = torch.tensor([-1e4, 1e4, -1e4, 0.0])
        return {
            "log-probs of ±1e4": with_logps(
                base, big, -big, **({"ref_chosen_logps": -big, "ref_rejected_logps": big} if reference else {})
            ),
            "equal log-probs": with_logps(
                base, base.chosen_logps, base.chosen_logps.clone(),
                **({"ref_rejected_logps": base.ref_chosen_logps} if reference else {}),
            ),
            "a batch of 1": example_inputs(batch=1, reference=reference),
        }

    def zero_margin(self, reference: bool = True) -> ZeroMargin:
        import torch

        same, tokens = torch.full((4,), -10.0), torch.full((4,), 10)
        inputs = with_logps(
            attrs.evolve(example_inputs(batch=4, reference=reference), chosen_mask=_mask(tokens)),
            same.clone(), same.clone(),
            ref_chosen_logps=same.clone() if reference else None,
            ref_rejected_logps=same.clone() if reference else None,
            chosen_lengths=tokens, rejected_lengths=tokens.clone(),
        )
        return ZeroMargin(inputs, (
            Expectation("chosen_logps", +1, "the chosen response's probability"),
            Expectation("rejected_logps", -1, "the rejected response's probability"),
        ))


# --------------------------------------------------------------------------- unpaired


@inputs_generator(UnpairedInputs)
class UnpairedInputsGenerator(InputsGenerator):
    """:class:`UnpairedInputs`: summed log-probs in [-60, -1], the reference's within ±3 nats of them,
    both labels (whenever the batch has two examples), a KL estimate in [0, 1), 3-30 tokens.

    The gradient reaches ``logps``. ``kl`` is a batch-level scalar: the stage
    estimates it from mismatched prompt/completion pairs of the whole batch
    (and every process), and the loss receives it as given, detached, so a
    shuffled batch keeps it; only the per-example fields are reordered.
    """

    gradient_fields = ("logps",)
    batch_fields = ("logps", "labels", "ref_logps", "lengths")

    def example(self, batch: int = 6, dtype: Any = None, seed: int = 0, reference: bool = True) -> UnpairedInputs:
        import torch

        dtype = dtype or torch.float32
        g = torch.Generator().manual_seed(seed)
        logps = -1 - 59 * torch.rand(batch, generator=g)
        ref_logps = (logps + 6 * torch.rand(batch, generator=g) - 3).clamp(max=-0.5)
        labels = torch.rand(batch, generator=g) < 0.5
        labels[: min(batch, 2)] = torch.tensor([True, False])[: min(batch, 2)]
        kl = torch.rand((), generator=g)
        lengths = torch.randint(3, 31, (batch,), generator=g)
        return UnpairedInputs(
            logps=logps.to(dtype),
            labels=labels,
            ref_logps=ref_logps.to(dtype) if reference else None,
            kl=kl.to(dtype) if reference else None,
            lengths=lengths,
        )

    def reward_shapes(self, inputs: UnpairedInputs) -> dict[str, tuple[tuple[int, ...], str]]:
        # the unpaired stage averages chosen_rewards over the desirable examples, rejected over the undesirable
        desirable = int(inputs.labels.sum())
        return {
            "chosen_rewards": ((desirable,), " (one per desirable example: the stage averages them over their count)"),
            "rejected_rewards": ((self.batch_size(inputs) - desirable,), " (one per undesirable example)"),
        }

    def extreme_cases(self, reference: bool = True) -> dict[str, Any]:
        import torch

        base = attrs.evolve(self.example(batch=4, reference=reference), labels=torch.tensor([True, False, False, True]))
        big = torch.tensor([-1e4, 1e4, -1e4, 0.0])
        refs = lambda **values: values if reference else {}  # noqa: E731
        return {
            "log-probs of ±1e4": attrs.evolve(base, logps=big, **refs(ref_logps=-big, kl=torch.tensor(1e4))),
            "equal log-probs": attrs.evolve(base, **refs(ref_logps=base.logps.clone(), kl=torch.tensor(0.0))),
            "a batch of one label only": attrs.evolve(base, labels=torch.ones(4, dtype=torch.bool)),
            "a batch of 1": self.example(batch=1, reference=reference),
        }

    def zero_margin(self, reference: bool = True) -> ZeroMargin:
        import torch

        logps = torch.tensor([-5.0, -10.0, -20.0, -40.0])
        labels = torch.tensor([True, False, True, False])
        inputs = UnpairedInputs(
            logps=logps, labels=labels, ref_logps=logps.clone() if reference else None,
            kl=torch.tensor(0.0) if reference else None, lengths=torch.full((4,), 10),
        )
        return ZeroMargin(inputs, (
            Expectation("logps", +1, "a desirable completion's probability", labels, " of the desirable examples"),
            Expectation("logps", -1, "an undesirable completion's probability", ~labels, " of the undesirable examples"),
        ), condition="at logps == ref_logps (kl 0)" if reference else "at zero margin")


# --------------------------------------------------------------------------- reward model


@inputs_generator(RewardInputs)
class RewardInputsGenerator(InputsGenerator):
    """:class:`RewardInputs`: rewards of a freshly initialised score head (normal, σ = 2) and a margin in [0, 2).

    The gradient reaches both rewards (the reward model's outputs); every
    field is per pair. There is no reference model: ``reference`` is ignored.
    """

    gradient_fields = ("chosen_rewards", "rejected_rewards")
    batch_fields = ("chosen_rewards", "rejected_rewards", "margin")

    def example(self, batch: int = 6, dtype: Any = None, seed: int = 0, reference: bool = True) -> RewardInputs:
        import torch

        dtype = dtype or torch.float32
        g = torch.Generator().manual_seed(seed)
        rewards = 2 * torch.randn(2, batch, generator=g)
        margin = 2 * torch.rand(batch, generator=g)
        return RewardInputs(chosen_rewards=rewards[0].to(dtype), rejected_rewards=rewards[1].to(dtype),
                            margin=margin.to(dtype))

    def extreme_cases(self, reference: bool = True) -> dict[str, Any]:
        import torch

        base = self.example(batch=4)
        big = torch.tensor([-1e4, 1e4, -1e4, 0.0])
        return {
            "rewards of ±1e4": attrs.evolve(base, chosen_rewards=big, rejected_rewards=-big),
            "equal rewards": attrs.evolve(base, rejected_rewards=base.chosen_rewards.clone(), margin=None),
            "a batch of 1": self.example(batch=1),
        }

    def zero_margin(self, reference: bool = True) -> ZeroMargin:
        import torch

        rewards = torch.tensor([-2.0, -0.5, 0.5, 2.0])
        return ZeroMargin(RewardInputs(chosen_rewards=rewards, rejected_rewards=rewards.clone()), (
            Expectation("chosen_rewards", +1, "the chosen response's reward"),
            Expectation("rejected_rewards", -1, "the rejected response's reward"),
        ), condition="at equal rewards (no margin)")


# --------------------------------------------------------------------------- groups (GRPO)


@inputs_generator(GroupInputs)
class GroupInputsGenerator(InputsGenerator):
    """:class:`GroupInputs`: per-token log-probs in [-8, 0] of 1-24 completion tokens (right-padded, the
    padding holding log-probs too, as a model computes them), the sampling policy's within a few tenths of
    a nat (some ratios outside the clipping range), the reference's within about half a nat, advantages of
    both signs, ``max_completion_length`` 24, ``num_items_in_batch`` the mask's sum, one process, one step
    per generation.

    The gradient reaches ``logps``. ``max_completion_length``,
    ``num_items_in_batch`` (the counted tokens of the whole generation batch),
    ``num_processes`` and ``steps_per_generation`` describe the batch as a
    whole, so a shuffled batch keeps them; the per-completion tensors are
    reordered.
    """

    gradient_fields = ("logps",)
    batch_fields = ("logps", "old_logps", "advantages", "mask", "ref_logps")
    max_completion_length = 24

    def example(self, batch: int = 6, dtype: Any = None, seed: int = 0, reference: bool = True) -> GroupInputs:
        import torch

        dtype = dtype or torch.float32
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, self.max_completion_length + 1, (batch,), generator=g)
        lengths[0] = self.max_completion_length  # the longest completion sets the width; the others are padded
        width = self.max_completion_length
        logps = -8 * torch.rand(batch, width, generator=g) ** 2
        old_logps = (logps + 0.2 * torch.randn(batch, width, generator=g)).clamp(max=0)
        ref_logps = (logps + 0.5 * torch.randn(batch, width, generator=g)).clamp(max=0)
        advantages = torch.randn(batch, generator=g)
        advantages[0] = advantages[0].abs() + 0.1
        if batch > 1:
            advantages[1] = -advantages[1].abs() - 0.1
        mask = _mask(lengths, width)
        return GroupInputs(
            logps=logps.to(dtype), old_logps=old_logps.to(dtype), advantages=advantages.to(dtype),
            mask=mask.to(dtype), ref_logps=ref_logps.to(dtype) if reference else None,
            max_completion_length=self.max_completion_length, num_items_in_batch=mask.sum().long(),
        )

    @staticmethod
    def with_mask(inputs: GroupInputs, mask: Any) -> GroupInputs:
        """``inputs`` with a new mask and the ``num_items_in_batch`` that goes with it."""
        return attrs.evolve(inputs, mask=mask, num_items_in_batch=mask.sum().long())

    def extreme_cases(self, reference: bool = True) -> dict[str, Any]:
        import torch

        base = self.example(batch=4, reference=reference)
        huge = torch.where(torch.arange(base.logps.size(1)) % 2 == 0, -1e4, base.logps)  # every other token
        ratio_old = torch.full_like(base.logps, -12.0)
        ratio_new = ratio_old + torch.tensor([10.0, -10.0, 10.0, -10.0])[:, None]
        emptied = base.mask.clone()
        emptied[1] = 0
        same = lambda logps: {"logps": logps, "old_logps": logps.clone(),  # noqa: E731
                              **({"ref_logps": logps.clone()} if reference else {})}
        return {
            "log-probs of -1e4": attrs.evolve(base, **same(huge)),
            "advantages of ±1e4": attrs.evolve(base, advantages=torch.tensor([1e4, -1e4, 1e4, -1e4])),
            "importance ratios of e^±10": attrs.evolve(
                base, logps=ratio_new, old_logps=ratio_old, advantages=torch.tensor([1.0, -1.0, -1.0, 1.0]),
                **({"ref_logps": ratio_old.clone()} if reference else {}),
            ),
            "equal log-probs and zero advantages": attrs.evolve(base, advantages=torch.zeros(4), **same(base.logps)),
            "a completion with every token masked": self.with_mask(base, emptied),
            "a batch of 1": self.example(batch=1, reference=reference),
        }

    def zero_margin(self, reference: bool = True) -> ZeroMargin:
        import torch

        base = self.example(batch=4, reference=reference)
        mask = _mask(torch.tensor([6, 3, 9, 5]), base.logps.size(1))
        advantages = torch.tensor([1.0, -1.0, 0.5, -2.0])
        inputs = attrs.evolve(
            self.with_mask(base, mask), advantages=advantages, old_logps=base.logps.clone(),
            ref_logps=base.logps.clone() if reference else None,
        )
        counted = mask.bool()
        return ZeroMargin(inputs, (
            Expectation("logps", +1, "their probability", counted & (advantages > 0)[:, None],
                        " on the tokens of completions with a positive advantage"),
            Expectation("logps", -1, "their probability", counted & (advantages < 0)[:, None],
                        " on the tokens of completions with a negative advantage"),
            Expectation("logps", 0, "the padding", ~counted, " on the padding (mask 0)"),
        ), condition="at logps == old_logps" + (" == ref_logps" if reference else ""))


__all__ = [
    "GENERATORS",
    "Expectation",
    "GroupInputsGenerator",
    "InputsGenerator",
    "PreferenceInputsGenerator",
    "RewardInputsGenerator",
    "UnpairedInputsGenerator",
    "ZeroMargin",
    "example_inputs",
    "example_inputs_for",
    "generator_for",
    "inputs_generator",
    "with_logps",
]

