"""The unpaired stage's Trainer; imported when the stage runs (it imports torch and transformers)."""

from __future__ import annotations

import torch

from molting.components import UnpairedInputs
from molting.logps import completion_logps
from molting.training import MoltingTrainer


class UnpairedTrainer(MoltingTrainer):
    """Runs the policy (and the reference) on the completions and the KL pairs and applies the loss plugin."""

    def kl_estimate(self, model, inputs):
        """trl's KTO reference point: mean policy-vs-reference log-ratio of the mismatched pairs,
        detached, averaged across processes, clamped at 0."""
        kl_batch = (inputs["KL_input_ids"], inputs["KL_attention_mask"], inputs["KL_completion_mask"])
        with torch.no_grad():
            kl_logps, _, _ = completion_logps(model, *kl_batch)
        ref_kl_logps = self.reference_logps(model, *kl_batch)
        kl = (kl_logps - ref_kl_logps).mean().detach()
        return self.accelerator.gather(kl).mean().clamp(min=0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, attention, completion = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        labels = inputs["label"].bool()
        logps, _, _ = completion_logps(model, ids, attention, completion)
        ref_logps = kl = None
        if self.has_reference:
            kl = self.kl_estimate(model, inputs)
            ref_logps = self.reference_logps(model, ids, attention, completion)
        desirable = int(labels.sum())
        out = self.apply_loss(
            UnpairedInputs(logps=logps, labels=labels, ref_logps=ref_logps, kl=kl, lengths=completion.sum(dim=1)),
            logps.size(0), {"chosen_rewards": (desirable,), "rejected_rewards": (logps.size(0) - desirable,)},
        )
        loss = out.losses.mean()
        self.record(self.unpaired_metrics(out, logps, labels, kl))
        return (loss, {"losses": out.losses}) if return_outputs else loss

    def unpaired_metrics(self, out, logps, labels, kl) -> dict[str, float]:
        """trl's KTO metric names: per-class means over every process's examples (sums and counts gathered)."""

        def total(value):
            return self.accelerator.gather(value.detach().float().reshape(1)).sum().item()

        n_chosen, n_rejected = total(labels.sum()), total((~labels).sum())
        metrics = {"count/chosen": n_chosen, "count/rejected": n_rejected}
        if kl is not None:
            metrics["kl"] = kl.item()
        if n_chosen > 0:
            metrics["logps/chosen"] = total(logps[labels].sum()) / n_chosen
            if out.chosen_rewards is not None:
                metrics["rewards/chosen"] = total(out.chosen_rewards.sum()) / n_chosen
        if n_rejected > 0:
            metrics["logps/rejected"] = total(logps[~labels].sum()) / n_rejected
            if out.rejected_rewards is not None:
                metrics["rewards/rejected"] = total(out.rejected_rewards.sum()) / n_rejected
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        for name, value in out.metrics.items():
            metrics[name] = value.detach() if hasattr(value, "detach") else value
        return metrics
