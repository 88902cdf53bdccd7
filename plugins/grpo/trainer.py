"""The grpo stage's Trainer: sampling, scoring, group-relative advantages and the loss plugin.

Imported when the stage runs (it imports torch, transformers and trl); see the
package's docstring for the batch layout, which is trl's GRPOTrainer's.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import RepeatSampler, shuffle_sequence_dict, split_tensor_dict

from molting.advantages import fill_skipped, group_stats
from molting.components import AdvantageInputs, GroupInputs
from molting.environments import episode_metrics, episode_seeds, episode_values, judged_completions
from molting.group_losses import high_entropy_mask
from molting.judging import data_columns
from molting.logps import completion_token_logps
from molting.sampling import completion_seeds, sample
from molting.training import MoltingTrainer, gather_rows

from . import GRPOParams


class GRPOTrainer(MoltingTrainer):
    """Samples and scores a generation batch every μ optimizer steps, then applies the loss plugin to it."""

    def __init__(self, *args: Any, grpo: GRPOParams, scorer: Any, advantage: Any, max_prompt_length: int | None = None,
                 advantage_params: Any = None, draw: Any = sample, episodes: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.draw = draw  # the run's sampler (molting.sampling.sampler_for); by default the hf one
        self.episodes = episodes  # molting.environments.EpisodeRunner with --env; None: single completions
        self.grpo, self.scorer, self.max_prompt_length = grpo, scorer, max_prompt_length
        self.advantage = advantage
        self.advantage_params = advantage.params() if advantage_params is None else advantage_params
        self.needs = advantage.requirements(self.advantage_params)
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
        if self._buffered is None:  # the first micro-step of this process: after a resume, not the run's first
            self._step = self.state.global_step * self.steps_per_generation
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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # said by trl's unwrapping
            with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as unwrapped:
                samples = self.draw_samples(unwrapped, items, p.temperature)
                baselines = self.greedy_rewards(unwrapped, items) if "greedy" in self.needs else None
        mask = samples.loss_mask
        if p.mask_truncated_completions:
            mask = mask * (~samples.truncated).unsqueeze(1).to(mask.dtype)
        batch: dict[str, Any] = {
            "prompt_ids": samples.prompt_ids, "prompt_mask": samples.prompt_mask,
            "completion_ids": samples.completion_ids, "completion_mask": samples.completion_mask, "loss_mask": mask,
            "index": torch.tensor([item["index"] for item in items], device=mask.device),
            "num_items_in_batch": self.accelerator.gather(mask.sum()).sum(),
        }
        if p.num_iterations > 1:  # the sampling policy's log-probs, for the ratio on the later iterations
            batch["old_logps"] = self.batched_logps(self.model, batch)
        if self.has_reference:
            batch["ref_logps"] = self.under_reference(self.model, lambda m: self.batched_logps(m, batch))
        kl = None
        if "reference" in self.needs:  # log π_old − log π_ref per token: the estimator's KL in the reward
            old = batch["old_logps"] if "old_logps" in batch else self.batched_logps(self.model, batch)
            kl = (old - batch["ref_logps"]) * mask
        batch["advantages"] = self.advantages(samples, rows, [item["index"] for item in items], mask=mask, kl=kl,
                                              baselines=baselines)
        self.record_completions(samples)
        return batch

    def draw_samples(self, model: Any, items: list[dict[str, Any]], temperature: float) -> Any:
        """One completion (or, with an environment, one episode) per item, each from its own random stream."""
        p = self.grpo
        rows = [item["row"] for item in items]
        seeds = self.completion_seeds(len(items))
        if self.episodes is not None:
            draw = self._step // (self.steps_per_generation * self.grpo.num_iterations)
            first = self.accelerator.process_index * len(items)
            groups = [(first + i) // p.num_generations for i in range(len(items))]
            return self.episodes(self.draw, model, self.processing_class, rows, [item["index"] for item in items],
                                 seeds, episode_seeds(self.args.seed, draw, groups), temperature=temperature)
        return self.draw(model, self.processing_class, [row["prompt"] for row in rows], n=1,
                         max_new_tokens=p.max_new_tokens, temperature=temperature, top_p=p.top_p, top_k=p.top_k,
                         batch_size=len(rows), max_prompt_length=self.max_prompt_length,
                         seeds=None if temperature == 0 else seeds)

    def completion_seeds(self, count: int) -> list[int]:
        """One random stream per completion, from the run's seed, the generation batch's number and the
        completion's place in the global batch: the same samples on one process or several, and after a resume."""
        draw = self._step // (self.steps_per_generation * self.grpo.num_iterations)
        return completion_seeds(self.args.seed, draw, self.accelerator.process_index * count, count)

    def batched_logps(self, model: Any, batch: dict[str, Any]) -> Any:
        size = self.args.per_device_train_batch_size
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
        return torch.cat([
            completion_token_logps(model, *(batch[k][start : start + size] for k in keys),
                                   temperature=self.grpo.temperature)[0]
            for start in range(0, batch["completion_ids"].size(0), size)
        ])

    def rewards(self, samples: Any, rows: list[dict[str, Any]], indices: list[int]) -> tuple[list[float], dict]:
        """Each completion's reward: the judges' weighted scores, plus the environment's (weighted) for episodes."""
        totals, per_judge = self.scorer(samples.prompts, judged_completions(samples), data_columns(rows), indices)
        if self.episodes is not None:
            totals = [total + reward for total, reward in zip(totals, self.episodes.rewards(samples))]
        return totals, per_judge

    def advantages(self, samples: Any, rows: list[dict[str, Any]], indices: list[int], mask: Any = None,
                   kl: Any = None, baselines: Any = None) -> Any:
        """Judge this process's completions, then run the advantage estimator on every process's rewards."""
        prompts = samples.prompts
        totals, per_judge = self.rewards(samples, rows, indices)
        device, g = self.accelerator.device, self.grpo.num_generations
        groups = torch.arange(len(totals) * self.accelerator.num_processes, device=device) // g
        rewards, skipped = fill_skipped(self._gathered(totals), groups)
        if mask is None:
            mask = torch.ones(len(prompts), 1, device=device)
        width = mask.size(1)
        out = self.advantage.compute(AdvantageInputs(
            rewards=rewards, groups=groups,
            mask=gather_rows(self.accelerator, mask.float()),
            kl=None if kl is None else gather_rows(self.accelerator, kl),
            baselines=None if baselines is None else self._gathered(baselines),
        ), self.advantage_params)
        std = group_stats(rewards, groups)[1]
        metrics = {"reward": rewards.mean().item(), "reward_std": rewards.std().item(),
                   "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).float().mean().item(),
                   **{name: float(value) for name, value in out.metrics.items()}}
        for name, scores in per_judge.items():
            values = self._gathered(scores)
            judged = values[~values.isnan()]  # a judgement skipped (judge_on_error: skip) is NaN
            metrics[f"rewards/{name}/mean"] = judged.mean().item() if judged.numel() else float("nan")
            metrics[f"rewards/{name}/std"] = judged.std().item() if judged.numel() > 1 else 0.0
        self.record({**metrics, **self.scorer.metrics()})
        start = self.accelerator.process_index * len(prompts)
        advantages = out.advantages.masked_fill(skipped.view(-1, *[1] * (out.advantages.dim() - 1)), 0.0)
        advantages = advantages[start : start + len(prompts)]
        return advantages[:, :width] if advantages.dim() == 2 else advantages

    def _gathered(self, values: Any) -> Any:
        values = torch.as_tensor(values, dtype=torch.float32, device=self.accelerator.device)
        return self.accelerator.gather(values)

    @torch.no_grad()
    def greedy_rewards(self, model: Any, items: list[dict[str, Any]]) -> list[float]:
        """ReMax's baseline: each completion's prompt answered greedily once (one episode, with an environment),
        judged by the run's judges."""
        g = self.grpo.num_generations
        firsts = items[::g]  # the generation batch holds each prompt's G copies in a row
        greedy = self.draw_samples(model, firsts, temperature=0)
        totals, _ = self.rewards(greedy, [item["row"] for item in firsts], [item["index"] for item in firsts])
        self.record({"baseline_reward": sum(totals) / len(totals)})
        return [total for total in totals for _ in range(g)]

    def record_completions(self, samples: Any) -> None:
        if samples.episodes is not None:
            self.record(episode_metrics({name: self.accelerator.gather(values)
                                         for name, values in episode_values(samples).items()}))
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
        # the model's own tokens (not an environment's), as masked for truncation; a batch without them: every one
        mask = inputs.get("loss_mask", inputs["completion_mask"])
        logps, entropy = completion_token_logps(model, inputs["prompt_ids"], inputs["prompt_mask"],
                                                inputs["completion_ids"], inputs["completion_mask"],
                                                temperature=self.grpo.temperature, with_entropy=True)
        old_logps = inputs.get("old_logps")
        entropy_mask = None
        if self.grpo.top_entropy_quantile < 1.0:
            entropy_mask = high_entropy_mask(entropy.detach(), mask, self.grpo.top_entropy_quantile, self._gather_all)
        group = GroupInputs(
            logps=logps, old_logps=logps.detach() if old_logps is None else old_logps,
            advantages=inputs["advantages"], mask=mask.to(logps.dtype), ref_logps=inputs.get("ref_logps"),
            max_completion_length=self.grpo.max_new_tokens, num_items_in_batch=inputs["num_items_in_batch"],
            num_processes=self.accelerator.num_processes, steps_per_generation=self.steps_per_generation,
            entropy_mask=entropy_mask,
        )
        out = self.apply_loss(group, logps.size(0))
        self.record_masked({"entropy": entropy, **out.metrics}, mask)  # trl: over every process's tokens
        loss = out.losses.mean()
        return (loss, {"losses": out.losses}) if return_outputs else loss

    def _gather_all(self, values: Any) -> Any:
        """Every process's ``values`` (1-D, of different lengths), as trl's entropy mask gathers them."""
        if self.accelerator.num_processes == 1:
            return values
        padded = self.accelerator.pad_across_processes(values, dim=0, pad_index=-1e9)  # entropies are >= 0
        every = self.accelerator.gather(padded)
        return every[every != -1e9]
