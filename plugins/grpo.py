"""The ``grpo`` stage: Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath, arXiv:2402.03300).

For each prompt the policy samples G completions (``num_generations``); the
run's judges score them; each completion's advantage is its reward minus the
mean of its group, divided by the group's standard deviation (or the
batch's, or not at all: ``scale_rewards``); the loss plugin (``grpo``,
``bnpo``, ``dr_grpo``, ``dapo``: see ``molting.plugins.grpo_losses``)
applies the clipped importance-ratio objective, with a KL penalty to the
starting model when β > 0. No value model, and no reference model at β = 0.

Batches are trl's ``GRPOTrainer``'s: ``batch_size`` counts completions per
device and micro-step (``per_device_train_batch_size``); one generation
batch, ``batch_size × gradient_accumulation_steps × processes`` completions
(that many / G prompts), is sampled once per optimizer step and cut into
the accumulation steps' micro-batches, so every micro-batch is on-policy.
With ``num_iterations`` μ > 1 the same generation batch serves μ optimizer
steps, and the log-probs of the policy that sampled it are computed once,
for the importance ratio. trl's ``RepeatSampler`` yields each generation
batch μ·S times, so the Trainer's own loop, checkpoints and resumption work
unchanged; the batch is sampled on the first of them.

Metrics (trl's names): ``reward``, ``reward_std``, ``rewards/{judge}/mean``
and ``/std``, ``frac_reward_zero_std``, ``completions/*``, ``entropy``,
``clip_ratio/{low,high,region}_mean`` and, with β > 0, ``kl``.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import attrs

import molting
from molting.components import Stage

METRICS = (
    "loss",
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "completions/mean_length",
    "completions/min_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "completions/mean_terminated_length",
)
"""Logged by every run; ``rewards/{judge}/mean`` and ``/std`` (one pair per judge) and ``kl`` (β > 0) as well."""


def _whole(minimum: int):
    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
            raise ValueError(f"{attribute.name} must be a whole number >= {minimum}, got {value!r}")

    return validate


@attrs.frozen
class GRPOParams:
    num_generations: int = attrs.field(default=8, validator=_whole(2))
    """Completions sampled per prompt (G): the group whose mean reward is the baseline."""
    max_new_tokens: int = attrs.field(default=256, validator=_whole(1))
    """Longest completion in tokens (trl's max_completion_length); Dr. GRPO's normaliser."""
    temperature: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    top_p: float = attrs.field(default=1.0, validator=[attrs.validators.gt(0), attrs.validators.le(1)])
    top_k: int = attrs.field(default=0, validator=_whole(0))
    """0: no top-k filtering."""
    num_iterations: int = attrs.field(default=1, validator=_whole(1))
    """Optimizer steps per generation batch (μ in the paper)."""
    scale_rewards: str = attrs.field(default="group", validator=attrs.validators.in_(("group", "batch", "none")))
    """Divide the advantages by the group's reward std, the whole batch's, or nothing (Dr. GRPO)."""
    mask_truncated_completions: bool = False
    """Leave completions cut at max_new_tokens (no end-of-sequence token) out of the loss, as DAPO does."""
    beta: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    """KL coefficient (shared with the loss); > 0 loads the reference model."""


@molting.hookimpl
def molting_register_stages(register):
    register(
        Stage(
            name="grpo",
            run=run_grpo,
            description="Online RL: G sampled completions per prompt, judged, group-relative advantages, clipped ratio.",
            columns=("prompt",),
            default_loss="grpo",
            default_data="demo-prompts",
            metrics=METRICS,
            inputs=molting.GroupInputs,
            params=GRPOParams,
            produces="policy",
            default_judges={"rule": 1.0},
            # 2 prompts x 8 completions a step, 120 steps: 20-35 s of training on 2 CPU cores
            demo_defaults={"learning_rate": 5e-5, "batch_size": 16, "max_steps": 120, "num_generations": 8,
                           "max_new_tokens": 20, "beta": 0.0, "lr_scheduler_type": "constant"},
        )
    )


# --------------------------------------------------------------------------- training


def grpo_trainer_class():
    """The Trainer subclass, built on first use so this module imports without torch."""
    import torch
    from trl.models import unwrap_model_for_generation
    from trl.trainer.utils import RepeatSampler, shuffle_sequence_dict, split_tensor_dict

    from molting.components import GroupInputs
    from molting.judging import data_columns
    from molting.sampling import completion_token_logps, sample
    from molting.training import MoltingTrainer

    class GRPOTrainer(MoltingTrainer):
        """Samples and scores a generation batch every μ optimizer steps, then applies the loss plugin to it."""

        def __init__(self, *args: Any, grpo: GRPOParams, scorer: Any, max_prompt_length: int | None = None,
                     **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.grpo, self.scorer, self.max_prompt_length = grpo, scorer, max_prompt_length
            self.steps_per_generation = self.args.gradient_accumulation_steps
            self._step = 0  # micro-steps taken
            self._buffered: list[dict[str, Any]] | None = None

        # -- the data: a generation batch of prompts, each G times, yielded μ·S times in a row

        def get_train_dataloader(self):
            return self._get_dataloader(self.train_dataset, "Training", self._train_batch_size * self.steps_per_generation,
                                        self._get_train_sampler, is_training=True)

        def _get_train_sampler(self, dataset: Any = None):
            g = self.grpo.num_generations
            completions = self.args.per_device_train_batch_size * self.args.world_size * self.steps_per_generation
            return RepeatSampler(dataset if dataset is not None else self.train_dataset, mini_repeat_count=g,
                                 batch_size=completions // g, repeat_count=self.grpo.num_iterations * self.steps_per_generation,
                                 shuffle=True, seed=self.args.seed)

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            loss = super().training_step(model, inputs, num_items_in_batch)  # inputs is a list of rows
            self._step += 1
            return loss

        def _prepare_inputs(self, generation_batch: Any) -> dict[str, Any]:
            if self._step % (self.steps_per_generation * self.grpo.num_iterations) == 0 or self._buffered is None:
                batch = shuffle_sequence_dict(self.generate_and_score(generation_batch))
                self._buffered = split_tensor_dict(batch, self.steps_per_generation)
            inputs = self._buffered[self._step % self.steps_per_generation]
            self.last_batch_indices = inputs["index"]
            return inputs

        # -- sampling and scoring

        @torch.no_grad()
        def generate_and_score(self, items: list[dict[str, Any]]) -> dict[str, Any]:
            p = self.grpo
            rows = [item["row"] for item in items]
            prompts = [row["prompt"] for row in rows]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # said by trl's unwrapping
                with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as unwrapped:
                    samples = sample(unwrapped, self.processing_class, prompts, n=1, max_new_tokens=p.max_new_tokens,
                                     temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, batch_size=len(prompts),
                                     max_prompt_length=self.max_prompt_length)
            mask = samples.completion_mask
            if p.mask_truncated_completions:
                mask = mask * (~samples.truncated).unsqueeze(1).to(mask.dtype)
            batch: dict[str, Any] = {
                "prompt_ids": samples.prompt_ids, "prompt_mask": samples.prompt_mask,
                "completion_ids": samples.completion_ids, "completion_mask": mask,
                "index": torch.tensor([item["index"] for item in items], device=mask.device),
                "num_items_in_batch": self.accelerator.gather(mask.sum()).sum(),
            }
            if p.num_iterations > 1:  # the sampling policy's log-probs, for the ratio on the later iterations
                batch["old_logps"] = self.batched_logps(self.model, batch)
            if self.has_reference:
                batch["ref_logps"] = self.under_reference(self.model, lambda m: self.batched_logps(m, batch))
            completions = [[{"role": "assistant", "content": t}] if not isinstance(q, str) else t
                           for q, t in zip(prompts, samples.texts)]
            batch["advantages"] = self.advantages(prompts, completions, rows, [item["index"] for item in items])
            self.record_completions(samples)
            return batch

        def batched_logps(self, model: Any, batch: dict[str, Any]) -> Any:
            size = self.args.per_device_train_batch_size
            keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
            return torch.cat([
                completion_token_logps(model, *(batch[k][start : start + size] for k in keys),
                                       temperature=self.grpo.temperature)[0]
                for start in range(0, batch["completion_ids"].size(0), size)
            ])

        def advantages(self, prompts: list[Any], completions: list[Any], rows: list[dict[str, Any]],
                       indices: list[int]) -> Any:
            """Judge this process's completions, then normalise within each group over every process's rewards."""
            totals, per_judge = self.scorer(prompts, completions, data_columns(rows), indices)
            device, g = self.accelerator.device, self.grpo.num_generations

            def gathered(values: list[float]) -> Any:
                return self.accelerator.gather(torch.tensor(values, dtype=torch.float32, device=device))

            rewards = gathered(totals)
            grouped = rewards.view(-1, g)
            advantages = rewards - grouped.mean(dim=1).repeat_interleave(g)
            if self.grpo.scale_rewards == "batch":
                std = rewards.std().expand_as(rewards)
            else:  # with "none" the group std only says which groups had no signal
                std = grouped.std(dim=1).repeat_interleave(g)
            if self.grpo.scale_rewards != "none":
                advantages = advantages / (std + 1e-4)
            metrics = {"reward": rewards.mean().item(), "reward_std": rewards.std().item(),
                       "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).float().mean().item()}
            for name, scores in per_judge.items():
                values = gathered(scores)
                metrics[f"rewards/{name}/mean"] = values.mean().item()
                metrics[f"rewards/{name}/std"] = values.std().item()
            self.record(metrics)
            start = self.accelerator.process_index * len(prompts)
            return advantages[start : start + len(prompts)]

        def record_completions(self, samples: Any) -> None:
            lengths = self.accelerator.gather(samples.lengths).float()
            truncated = self.accelerator.gather(samples.truncated)
            terminated = lengths[~truncated] if (~truncated).any() else lengths.new_zeros(1)
            self.record({
                "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
                "completions/max_length": lengths.max().item(), "completions/clipped_ratio": truncated.float().mean().item(),
                "completions/mean_terminated_length": terminated.mean().item(),
            })

        # -- the loss

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            mask = inputs["completion_mask"]
            logps, entropy = completion_token_logps(model, inputs["prompt_ids"], inputs["prompt_mask"],
                                                    inputs["completion_ids"], mask, temperature=self.grpo.temperature,
                                                    with_entropy=True)
            old_logps = inputs.get("old_logps")
            group = GroupInputs(
                logps=logps, old_logps=logps.detach() if old_logps is None else old_logps,
                advantages=inputs["advantages"], mask=mask.to(logps.dtype), ref_logps=inputs.get("ref_logps"),
                max_completion_length=self.grpo.max_new_tokens, num_items_in_batch=inputs["num_items_in_batch"],
                num_processes=self.accelerator.num_processes, steps_per_generation=self.steps_per_generation,
            )
            out = self.loss_plugin.compute(group, self.loss_params)
            self.record_token_means({"entropy": entropy, **out.metrics}, mask)
            loss = out.losses.mean()
            return (loss, {"losses": out.losses}) if return_outputs else loss

        def record_token_means(self, metrics: dict[str, Any], mask: Any) -> None:
            """(batch, tokens) maps: mean over the completion tokens of every process, as trl; others as given."""
            recorded = {name: value.detach() if isinstance(value, torch.Tensor) else value
                        for name, value in metrics.items()}
            maps = [name for name, value in recorded.items() if isinstance(value, torch.Tensor) and value.dim() == 2]
            if maps:  # one reduction (and one host sync) for all of them
                sums = [(recorded[name].float() * mask).sum() for name in maps]
                total = self.accelerator.reduce(torch.stack([*sums, mask.sum().float()]), reduction="sum")
                recorded.update(zip(maps, (total[:-1] / total[-1].clamp(min=1.0)).tolist()))
            self.record(recorded)

    return GRPOTrainer


# --------------------------------------------------------------------------- the stage


def prompt_rows(rows: list[dict[str, Any]], tokenizer: Any, limit: int, overlong: str, source: str) -> list[dict[str, Any]]:
    """``{"index": data row, "row": row}`` for each usable row (a ``prompt`` string or message list), overlong
    prompts dropped or counted."""
    from molting.data import check_columns, check_text_fields, with_bos
    from molting.errors import DataError
    from molting.sampling import prompt_texts

    check_columns(rows, [("prompt",)], source, "grpo")
    if check_text_fields(rows, ("prompt",), source) and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source} is conversational (message lists) but the model's tokenizer has no chat template")
    texts = [with_bos(text, tokenizer) for text in prompt_texts([r["prompt"] for r in rows], tokenizer)]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # as sample() counts them
    long = [i for i, n in enumerate(lengths) if n > limit]
    if long:
        action = "dropped" if overlong == "drop" else f"cut to their last {limit} tokens"
        print(f"molting: {len(long)} of {len(rows)} prompts (e.g. row {long[0]}) are longer than max_length - "
              f"max_new_tokens = {limit} tokens: {action}", file=sys.stderr)
    dropped = set(long) if overlong == "drop" else set()
    return [{"index": i, "row": row} for i, row in enumerate(rows) if i not in dropped]


def run_grpo(context) -> dict[str, Any]:
    from trl.trainer.utils import identity

    from molting.errors import ConfigError, DataError
    from molting.judging import Scorer, resolve_judges
    from molting.training import (announce, load_policy, reference_for, stage_callbacks, train_and_save,
                                  training_arguments)

    config, params = context.config, context.stage_params
    if config.precompute_ref or config.padding_free:
        raise ConfigError("the grpo stage samples new completions every step: --precompute-ref and --padding-free "
                          "do not apply to it")
    limit = config.max_length - params.max_new_tokens
    if limit < 1:
        raise ConfigError(f"max_length ({config.max_length}) must exceed max_new_tokens ({params.max_new_tokens}): "
                          "it bounds prompt and completion together")
    scorer = Scorer(resolve_judges(context.host, config, context.stage.default_judges, context.artifacts, "stage 'grpo'"))
    model, tokenizer = load_policy(context)
    args = training_arguments(config, context.output_dir)
    g = params.num_generations
    completions = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    if completions % g:
        raise ConfigError(
            f"batch_size counts completions, as trl's per_device_train_batch_size does: batch_size x "
            f"gradient_accumulation_steps x processes ({completions}) must be a multiple of num_generations ({g}), "
            f"e.g. --batch-size {g * max(1, round(config.batch_size / g))}"
        )
    rows = prompt_rows(context.rows, tokenizer, limit, config.overlong, context.data_source)
    if len(rows) < completions // g:
        raise DataError(f"{context.data_source} has {len(rows)} usable prompts; one generation batch needs "
                        f"{completions // g} ({completions} completions / {g} per prompt)")
    ref_model, adapter_reference, reference = reference_for(model, context, needed=params.beta > 0)
    trainer = grpo_trainer_class()(
        model=model, args=args, train_dataset=rows,
        data_collator=identity, processing_class=tokenizer, callbacks=stage_callbacks(context), loss=context.loss,
        loss_params=context.loss_params, ref_model=ref_model, adapter_reference=adapter_reference, grpo=params,
        scorer=scorer, max_prompt_length=limit if config.overlong != "drop" else None,
    )
    judges = ", ".join(f"{spec.name} x{spec.weight:g}" for spec in scorer.specs)
    announce(trainer, f"{len(rows)} prompts, {g} completions each, {completions // g} prompts per optimizer step, "
                      f"judges {judges}", reference)
    return train_and_save(trainer, tokenizer, context)
