"""The online-dpo stage's Trainer: sample, rank and train, once per micro-step.

Imported when the stage runs (it imports torch, transformers and trl). The
Trainer's batches are lists of prompt rows (``data_collator=identity``);
:meth:`OnlineDPOTrainer._prepare_inputs` turns each into a batch of fresh
pairs laid out as the offline preference stage's (chosen rows first, then
rejected: :class:`molting.pairs.PairCollator`), and :func:`online_dpo_loss`
applies the loss plugin to it. Everything but the sampling is a plain
function of its arguments, so it can be tested on a fixed batch.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import identity

from molting.judging import data_columns
from molting.pairs import PairCollator, preference_inputs, preference_metrics
from molting.sampling import Samples, pad_token_id, sample
from molting.training import MoltingTrainer

from . import OnlineDPOParams
from molting.ranking import Ranking, rank


class OnlineDPOTrainer(MoltingTrainer):
    """Each micro-step samples completions for its prompts from the current policy, ranks them, and trains on
    the pairs; the Trainer's loop, gradient accumulation, checkpoints and resumption are unchanged."""

    def __init__(self, *args: Any, online: OnlineDPOParams, scorer: Any, max_prompt_length: int | None = None,
                 draw: Callable[..., Samples] = sample, **kwargs: Any) -> None:
        super().__init__(*args, data_collator=identity, **kwargs)  # a batch stays a list of prompt rows
        self.online, self.scorer, self.max_prompt_length = online, scorer, max_prompt_length
        self.draw = draw  # the run's --sampler (molting.sampling.sampler_for)
        self.pad_token_id = pad_token_id(self.processing_class)

    # -- 1. sample, 2. rank, 3. lay out the pairs: the batch of prompt rows becomes a batch of pairs

    def _prepare_inputs(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        rows, indices = [item["row"] for item in items], [item["index"] for item in items]
        samples = self.sample_completions([row["prompt"] for row in rows])
        ranking = self.rank_samples(samples, rows, indices)
        self.record(sampling_metrics(samples, ranking))
        batch = pair_batch(samples, ranking, indices, self.online.num_samples, self.online.skip_ties,
                           self.pad_token_id)
        self.last_batch_indices = batch["index"]  # what the non-finite guard names if this step goes wrong
        return super()._prepare_inputs(batch)  # onto the device

    def sample_completions(self, prompts: list[Any]) -> Samples:
        """``num_samples`` completions of each prompt from the policy as it is now, without gradients."""
        p = self.online
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # said by trl's unwrapping
            with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as unwrapped:
                return self.draw(unwrapped, self.processing_class, prompts, n=p.num_samples,
                                 max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
                                 top_k=p.top_k, batch_size=len(prompts) * p.num_samples,
                                 max_prompt_length=self.max_prompt_length)

    def rank_samples(self, samples: Samples, rows: list[dict[str, Any]], indices: list[int]) -> Ranking:
        """The judges' pair for each prompt; they see the data's other columns (``answer``, ...) and the data
        row of each prompt (for their error messages)."""
        completions = [text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]
                       for prompt, text in zip(samples.prompts, samples.texts)]
        return rank(self.scorer, samples.prompts, completions, samples.texts, self.online.num_samples,
                    data_columns([rows[g] for g in samples.rows]), [indices[g] for g in samples.rows],
                    samples.truncated.tolist(), self.online.missing_eos_penalty)

    # -- 4. the loss

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        loss, losses, per_completion, per_pair = online_dpo_loss(model, inputs, self.loss_plugin, self.loss_params,
                                                                 self.under_reference)
        self.record(per_completion)
        self.record_masked(per_pair, inputs["keep"], skip_empty=True)  # over the kept pairs of every process
        return (loss, {"losses": losses}) if return_outputs else loss


# --------------------------------------------------------------------------- the pieces, as plain functions


def pair_batch(samples: Samples, ranking: Ranking, indices: list[int], n: int, skip_ties: bool,
               pad_token_id: int) -> dict[str, Any]:
    """A :class:`molting.pairs.PairCollator` batch of every prompt's pair, plus what the loss needs to know.

    The prompt's tokens are the ones the policy was sampled with (left
    padding removed); each completion runs up to and including its first
    EOS, as sampled. ``keep`` marks the pairs the loss trains on (not the
    ties, with ``skip_ties``); ``chosen_scores`` / ``rejected_scores`` are the
    judges' totals when the judges are pointwise.
    """
    def tokens(ids: torch.Tensor, mask: torch.Tensor, k: int) -> list[int]:
        return ids[k][mask[k].bool()].tolist()

    examples = []
    for group, (pair, index) in enumerate(zip(ranking.pairs, indices)):
        chosen, rejected = group * n + pair.chosen, group * n + pair.rejected
        examples.append({
            "index": index,
            "prompt_ids": tokens(samples.prompt_ids, samples.prompt_mask, chosen),
            "chosen_ids": tokens(samples.completion_ids, samples.completion_mask, chosen),
            "rejected_ids": tokens(samples.completion_ids, samples.completion_mask, rejected),
        })
    batch = PairCollator(pad_token_id)(examples)
    batch["keep"] = torch.tensor([not (pair.tie and skip_ties) for pair in ranking.pairs])
    if ranking.scores is not None:
        starts = [group * n for group in range(len(ranking.pairs))]
        batch["chosen_scores"] = torch.tensor([ranking.scores[s + p.chosen] for s, p in zip(starts, ranking.pairs)])
        batch["rejected_scores"] = torch.tensor([ranking.scores[s + p.rejected] for s, p in zip(starts, ranking.pairs)])
    return batch


def online_dpo_loss(model: Any, batch: dict[str, Any], loss: Any, loss_params: Any,
                    under_reference: Callable[..., Any] | None = None) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """``(loss, per-pair losses, per-completion metrics, per-pair metrics)`` of a :func:`pair_batch`.

    Every pair goes through the policy (and the reference) in one forward and
    through the loss plugin, as in the preference stage; the loss is the mean
    over the kept pairs, so ties weigh nothing. Shapes stay the same whatever
    the judge decided, and a batch of ties only gives a zero loss that is
    still a function of the weights: the backward pass and the optimizer step
    run as usual, on every process alike.
    """
    inputs, logps = preference_inputs(model, batch, under_reference)
    out = loss.compute(inputs, loss_params)
    keep = batch["keep"].to(out.losses.dtype)
    mean = (out.losses * keep).sum() / keep.sum().clamp(min=1)
    half = logps.size(0) // 2
    per_pair = preference_metrics(out, logps[:half], logps[half:])
    return mean, out.losses, objective_metrics(inputs, logps, batch, getattr(loss_params, "beta", None)), per_pair


def objective_metrics(inputs: Any, logps: torch.Tensor, batch: dict[str, Any], beta: float | None) -> dict[str, Any]:
    """trl's ``objective/*`` over every completion of the batch (chosen rows, then rejected), and ``beta``.

    KL is the sample estimate Σ_t log π/π_ref of each completion, entropy
    the sample estimate -Σ_t log π, as trl's OnlineDPOTrainer computes them.
    """
    metrics: dict[str, Any] = {"objective/entropy": -logps.detach()}
    if beta is not None:
        metrics["beta"] = float(beta)
    if inputs.ref_chosen_logps is None:
        return metrics  # no reference: no KL
    ref = torch.cat([inputs.ref_chosen_logps, inputs.ref_rejected_logps])
    kl = logps.detach() - ref
    metrics["objective/kl"] = kl
    if beta is not None:
        metrics["objective/non_score_reward"] = -beta * kl
        if "chosen_scores" in batch:
            scores = torch.cat([batch["chosen_scores"], batch["rejected_scores"]]).to(kl)
            metrics["objective/rlhf_reward"] = scores - beta * kl
    return metrics


def sampling_metrics(samples: Samples, ranking: Ranking) -> dict[str, torch.Tensor]:
    """What the sampled completions and their ranking say, before any training on them (one value per
    completion or per prompt, so that the Trainer averages them over every process)."""
    pairs, device = ranking.pairs, samples.truncated.device
    metrics = {
        "val/contain_eos_token": (~samples.truncated).float(),
        "completions/mean_length": samples.lengths.float(),
        "frac_ties": torch.tensor([float(pair.tie) for pair in pairs], device=device),
    }
    if ranking.scores is not None:
        n = len(ranking.scores) // len(pairs)
        margins = [ranking.scores[g * n + p.chosen] - ranking.scores[g * n + p.rejected] for g, p in enumerate(pairs)]
        metrics["objective/scores"] = torch.tensor(ranking.scores, device=device)
        metrics["objective/scores_margin"] = torch.tensor(margins, device=device)
    return metrics
