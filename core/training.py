"""Machinery shared by the stages: a Trainer base with trl-style metric logging,
log-probabilities of completions, and the callbacks that write metrics.jsonl.

Stages subclass :class:`MoltingTrainer` (a ``transformers.Trainer``), so
accelerate, DeepSpeed, FSDP, checkpoints and progress bars come for free.
This module imports torch and transformers; only stages import it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from molting.config import RunConfig


class MoltingTrainer(Trainer):
    """A Trainer that averages per-step metrics recorded with :meth:`record` into each log.

    Values are gathered across processes before averaging, as trl does, so the
    logged numbers are the same for one process and for many.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def record(self, metrics: Mapping[str, torch.Tensor | float]) -> None:
        mode = "train" if self.model.training else "eval"
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().reshape(-1)
                value = self.accelerator.gather_for_metrics(value).mean().item()
            self._metrics[mode][name].append(float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        averaged = {name: sum(values) / len(values) for name, values in self._metrics[mode].items() if values}
        if mode == "eval":
            averaged = {f"eval_{name}": value for name, value in averaged.items()}
        logs.update(averaged)
        super().log(logs, start_time)
        self._metrics[mode].clear()


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the completion tokens of right-padded sequences.

    Returns ``(sum_logps, token_logps, token_mask)``: the per-sequence sum
    (shape ``(batch,)``), and per-token log-probs with their mask (shape
    ``(batch, k)``, zero outside the completion). The output layer runs only on
    the last ``k`` positions, the ones that can predict a completion token,
    instead of on the whole sequence.
    """
    length = input_ids.size(1)
    first_completion = completion_mask.float().argmax(dim=1).min().item()
    keep = length - max(int(first_completion), 1) + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep).logits
    logits = logits[:, :-1].float()
    labels = input_ids[:, length - keep + 1 :]
    mask = completion_mask[:, length - keep + 1 :].to(logits.dtype)
    token_logps = torch.gather(logits, 2, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    token_logps = token_logps * mask
    return token_logps.sum(dim=1), token_logps, mask


def training_arguments(config: RunConfig, output_dir: Path, **overrides: Any) -> TrainingArguments:
    """The ``TrainingArguments`` a stage runs with, from the run's config."""
    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="no",
        report_to=[] if config.report_to == "none" else [config.report_to],
        remove_unused_columns=False,
        bf16=use_bf16,  # fp32 is fastest on CPUs without native bf16
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class MetricsFile(TrainerCallback):
    """Appends each log to ``metrics.jsonl`` (one JSON object a line) and calls ``molting_on_log``."""

    def __init__(self, path: Path, hook: Any) -> None:
        self.path = path
        self.hook = hook

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, **logs}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self.hook.molting_on_log(metrics=dict(logs), step=state.global_step)


def save_final(trainer: Trainer, tokenizer: Any, output_dir: Path) -> None:
    """Save the trained model and tokenizer as plain transformers files (safetensors).

    The Trainer also pickles its arguments to training_args.bin; the run's
    settings are in molting_run.json, so the pickle is removed and the output
    directory holds no file that needs unpickling.
    """
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(output_dir))
        (Path(output_dir) / "training_args.bin").unlink(missing_ok=True)


def last_values(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """The last logged value of every metric in a Trainer's log history."""
    merged: dict[str, Any] = {}
    for entry in log_history:
        merged.update(entry)
    return merged
