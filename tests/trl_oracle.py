"""trl as a test oracle: its DPO loss code, run on log-prob tensors the test chooses.

trl computes its losses inside ``DPOTrainer._compute_loss`` from the output of
the model's fused LM head (per-token log-probs). :class:`FixedLogps` stands in
for that model output so trl's own loss and metric code runs, unchanged, on the
exact tensors molting's loss receives. This is a harness for trl, not a
replacement for anything molting ships.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch


class FixedLogps(torch.nn.Module):
    """A 'model' whose fused-LM-head output is a fixed tensor of per-token log-probs."""

    def __init__(self, token_logps: torch.Tensor) -> None:
        super().__init__()
        self.token_logps = token_logps

    def forward(self, **kwargs):
        zeros = torch.zeros_like(self.token_logps)
        return SimpleNamespace(
            log_probs=self.token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), log_sum_sq_probs=zeros
        )


def make_dpo_trainer(model_dir, tmp_path):
    """A real trl DPOTrainer on the demo model (its model is never used by :func:`trl_dpo`)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    # float32 as molting loads it: from_pretrained would take the dtype config.json records (the demo model's is bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"prompt": "Q: What is 1 + 1?\nA:", "chosen": " 2", "rejected": " 3"}] * 2
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=2, bf16=False,
        gradient_checkpointing=False, use_cpu=True,
    )
    return DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=args,
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
    )


def spread(total: torch.Tensor, lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (and mask) whose row sums are ``total``: total/length on each of ``length`` tokens."""
    mask = (torch.arange(width)[None, :] < lengths[:, None]).to(total.dtype)
    return mask * (total / lengths)[:, None], mask


def trl_dpo(trainer, loss_type: str, chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len,
            beta: float = 0.1, label_smoothing: float = 0.0, **extra):
    """(loss, metrics) from trl's DPOTrainer loss code on these summed log-probs."""
    width = int(max(chosen_len.max(), rejected_len.max()))
    token_logps, mask = spread(torch.cat([chosen, rejected]), torch.cat([chosen_len, rejected_len]), width)
    completion_mask = torch.cat([torch.zeros(mask.size(0), 1), mask], dim=1).long()  # position 0 is the prompt
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    trainer.precompute_ref_logps = True
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.beta, trainer.label_smoothing = beta, label_smoothing
    for key, value in extra.items():
        setattr(trainer.args if key == "discopop_tau" else trainer, key, value)
    trainer.model.train()  # trl files metrics under "train" only in training mode
    trainer._metrics["train"].clear()
    loss = trainer._compute_loss(FixedLogps(token_logps), inputs, return_outputs=False)
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss, metrics


def molting_inputs(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len):
    """The ``PreferenceInputs`` that match what :func:`trl_dpo` feeds trl, tensor for tensor.

    trl sums the per-token log-probs that :func:`spread` lays out, and that sum
    can differ from ``chosen`` in the last float32 bit; the summed log-probs
    here are the same sums, and ``chosen_token_logps``/``chosen_mask`` the same
    per-token layout (total/length on each of length tokens, same width), which
    the ``sft`` loss averages.
    """
    from molting.components import PreferenceInputs

    width = int(max(chosen_len.max(), rejected_len.max()))
    token_logps, mask = spread(torch.cat([chosen, rejected]), torch.cat([chosen_len, rejected_len]), width)
    n = chosen.size(0)
    sums = token_logps.sum(dim=1)
    return PreferenceInputs(
        chosen_logps=sums[:n], rejected_logps=sums[n:], ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
        chosen_lengths=chosen_len, rejected_lengths=rejected_len,
        chosen_token_logps=token_logps[:n], chosen_mask=mask[:n],
    )


# --------------------------------------------------------------------------- KTO


class FixedKTOLogps(torch.nn.Module):
    """A 'model' for trl's KTO loss code: fixed per-token log-probs for the completions, other ones for the KL pairs.

    trl's ``KTOTrainer._compute_loss`` calls the model twice, first on the KL
    (mismatched) sequences, then on the completions; :func:`trl_kto` fills
    ``KL_input_ids`` with 1 and ``input_ids`` with 0, so the first token says
    which call this is.
    """

    def __init__(self, token_logps: torch.Tensor, kl_token_logps: torch.Tensor) -> None:
        super().__init__()
        self.token_logps = token_logps
        self.kl_token_logps = kl_token_logps

    def forward(self, input_ids, **kwargs):
        logps = self.kl_token_logps if bool(input_ids[0, 0] == 1) else self.token_logps
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros)


def kto_stand_in(beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """The least of a ``KTOTrainer`` that its ``_compute_loss`` needs, on one CPU process, reference log-probs
    read from the batch (``precompute_ref_logps``), as when trl precomputes them."""
    from collections import defaultdict
    from functools import partial

    from trl import KTOTrainer

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, calculate_KL=True, precompute_ref_logps=True,
        loss_type="kto", beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    fake._compute_kl_logps = partial(KTOTrainer._compute_kl_logps, fake)
    return fake


def trl_kto(fake, logps, ref_logps, kl_logps, ref_kl_logps, labels, lengths, kl_lengths):
    """(loss, metrics) from trl's ``KTOTrainer._compute_loss`` on these summed log-probs.

    ``logps`` / ``kl_logps`` (the policy's, on the completions and on the KL
    pairs) are spread over ``lengths`` / ``kl_lengths`` tokens as
    :func:`spread` does; trl sums them back. Returns trl's loss and the last
    value of each metric it logged.
    """
    from trl import KTOTrainer

    width = int(max(lengths.max(), kl_lengths.max()))
    token_logps, mask = spread(logps, lengths, width)
    kl_token_logps, kl_mask = spread(kl_logps, kl_lengths, width)
    completion_mask = torch.cat([torch.zeros(mask.size(0), 1), mask], dim=1).long()  # position 0 is the prompt
    kl_completion_mask = torch.cat([torch.zeros(kl_mask.size(0), 1), kl_mask], dim=1).long()
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "KL_input_ids": torch.ones_like(kl_completion_mask),
        "KL_attention_mask": torch.ones_like(kl_completion_mask),
        "KL_completion_mask": kl_completion_mask,
        "label": labels,
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    fake._metrics["train"].clear()
    loss = KTOTrainer._compute_loss(fake, FixedKTOLogps(token_logps, kl_token_logps), inputs, return_outputs=False)
    metrics = {name: values[-1] for name, values in fake._metrics["train"].items()}
    return loss, metrics


def make_kto_trainer(model_dir, tmp_path, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """A real trl KTOTrainer on the demo model (its train data is a placeholder; tests hand it their own batch)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    # float32 as molting loads it: from_pretrained would take the dtype config.json records (the demo model's is bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"prompt": "Q: What is 1 + 1?\nA:", "completion": " 2", "label": True},
            {"prompt": "Q: What is 1 + 1?\nA:", "completion": " 3", "label": False}]
    args = KTOConfig(
        output_dir=str(tmp_path / "trl-kto"), report_to=[], per_device_train_batch_size=2, bf16=False,
        gradient_checkpointing=False, use_cpu=True, beta=beta, desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    return KTOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=args,
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
    )
