"""The reward stage's Trainer; imported when the stage runs (it imports torch and transformers)."""

from __future__ import annotations

from molting.components import RewardInputs
from molting.training import MoltingTrainer


class RewardTrainer(MoltingTrainer):
    """Scores chosen and rejected in one forward and applies the loss plugin to the two rewards."""

    total_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards = rewards.logits.squeeze(-1).float()
        chosen, rejected = rewards.chunk(2)
        batch = chosen.size(0)
        out = self.apply_loss(RewardInputs(chosen_rewards=chosen, rejected_rewards=rejected, margin=inputs.get("margin")),
                              batch, {"chosen_rewards": (batch,), "rejected_rewards": (batch,)})
        loss = out.losses.mean()
        self.record_reward_metrics(out, chosen, rejected, inputs["attention_mask"])
        return (loss, {"losses": out.losses, "rewards": rewards}) if return_outputs else loss

    def record_reward_metrics(self, out, chosen, rejected, attention_mask) -> None:
        """trl's RewardTrainer metrics, from the loss's rewards (the model's, for the bradley-terry loss)."""
        import torch

        chosen = (out.chosen_rewards if out.chosen_rewards is not None else chosen).detach()
        rejected = (out.rejected_rewards if out.rejected_rewards is not None else rejected).detach()
        everything = self.accelerator.gather(torch.cat([chosen, rejected]))
        metrics = {
            "accuracy": (chosen > rejected).float(),
            "margin": chosen - rejected,
            "min_reward": everything.min().item(),
            "mean_reward": everything.mean().item(),
            "max_reward": everything.max().item(),
        }
        metrics.update({k: v.detach() if hasattr(v, "detach") else v for k, v in out.metrics.items()})
        self.record(metrics)
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self.total_tokens += int(self.accelerator.gather_for_metrics(attention_mask.sum().reshape(1)).sum())
        self._metrics[mode]["num_tokens"] = [float(self.total_tokens)]  # a running total: the latest, not a mean
