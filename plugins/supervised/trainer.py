"""The supervised stage's Trainer; imported when the stage runs (it imports torch and transformers)."""

from __future__ import annotations

import torch

from molting.logps import completion_token_stats
from molting.training import MoltingTrainer


class SFTTrainer(MoltingTrainer):
    """Mean negative log-likelihood of the completion tokens, normalised as trl's SFTTrainer normalises it."""

    total_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        token_logps, mask, entropy, top1 = completion_token_stats(
            model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        )
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -token_logps.sum() / torch.as_tensor(count).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens and DDP averages the gradients: as trl and Trainer
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        self.record_sft_metrics(inputs["attention_mask"], mask, entropy, top1)
        return (loss, {"token_logps": token_logps}) if return_outputs else loss

    def record_sft_metrics(self, attention_mask, mask, entropy, top1) -> None:
        """trl's metrics: entropy and top-1 accuracy over every process's completion tokens, tokens seen so far."""

        def total(value):
            return self.accelerator.gather_for_metrics(value.detach().reshape(1)).sum()

        valid = total(mask.sum())
        entropy_sum, correct = total(entropy.sum()), total(top1.sum())
        self.record({
            "entropy": (entropy_sum / valid).item() if valid > 0 else 0.0,
            "mean_token_accuracy": (correct / valid).item() if valid > 0 else 0.0,
        })
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self.total_tokens += int(total(attention_mask.sum()).item())
        self._metrics[mode]["num_tokens"] = [float(self.total_tokens)]  # a running total: the latest, not a mean
