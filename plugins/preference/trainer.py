"""The preference stage's Trainer; imported when the stage runs (it imports torch and transformers)."""

from __future__ import annotations

from typing import Any

from molting.pairs import preference_inputs, preference_metrics
from molting.training import MoltingTrainer


class PreferenceTrainer(MoltingTrainer):
    """Runs the policy (and the reference, unless precomputed) on chosen+rejected and applies the loss plugin."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        pair_inputs, logps = preference_inputs(model, inputs, self.under_reference)
        batch = pair_inputs.chosen_logps.size(0)
        out = self.apply_loss(pair_inputs, batch, {"chosen_rewards": (batch,), "rejected_rewards": (batch,)})
        loss = out.losses.mean()
        half = logps.size(0) // 2
        self.record(preference_metrics(out, logps[:half], logps[half:]))
        return (loss, {"losses": out.losses}) if return_outputs else loss
