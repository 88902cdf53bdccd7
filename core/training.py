"""Machinery shared by the stages: a Trainer base with trl-style metric logging,
log-probabilities of completions, and the callbacks that write metrics.jsonl.

Stages subclass :class:`MoltingTrainer` (a ``transformers.Trainer``), so
accelerate, DeepSpeed, FSDP, checkpoints and progress bars come for free.
This module imports torch and transformers; only stages import it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from molting.config import TORCH_OPTIMIZERS, RunConfig
from molting.context import StageContext, log_metrics
from molting.errors import ConfigError, MoltingError
from molting.files import now_utc, write_json_atomic
from molting.logps import completion_logps


class RunLoss:
    """The sum of a run's finite training losses and the optimizer steps they make up, across resumes.

    The Trainer's ``train_loss`` divides the losses of the steps since a
    resume by every step of the run; this one is saved with each checkpoint
    (``molting_loss.json``) and read back on resume, so the summary covers the
    whole run, and leaves out the steps a non-finite loss skipped.
    """

    FILE = "molting_loss.json"

    def __init__(self) -> None:
        self.total: Any = 0.0  # a tensor once a loss is added: summed on the device, read once
        self.steps = 0.0

    def add(self, loss: Any, accumulation: int) -> None:
        self.total = self.total + loss.detach().float()
        self.steps += 1 / accumulation

    def mean(self, accelerator: Any) -> float:
        """The mean loss per optimizer step, over every process (a collective call)."""
        return self.gathered(accelerator) / max(self.steps, 1e-9)

    def gathered(self, accelerator: Any) -> float:
        total = torch.as_tensor(self.total, dtype=torch.float32, device=accelerator.device).reshape(1)
        return float(accelerator.gather(total).mean())

    def save(self, checkpoint: str, total: float) -> None:
        write_json_atomic(Path(checkpoint) / self.FILE, {"loss_sum": total, "steps": self.steps})

    def load(self, checkpoint: str) -> None:
        path = Path(checkpoint) / self.FILE
        if path.is_file():
            saved = json.loads(path.read_text())
            self.total, self.steps = float(saved["loss_sum"]), float(saved["steps"])


class MoltingTrainer(Trainer):
    """The Trainer every stage builds on.

    - holds the loss plugin, its hyperparameters, and the reference: a frozen
      model, or the policy itself with its LoRA adapter disabled
      (:meth:`reference_logps`);
    - averages per-step metrics recorded with :meth:`record` into each log,
      gathered across processes first, as trl does, so the logged numbers are
      the same for one process and for many;
    - writes checkpoints atomically: into a hidden staging folder, then
      renamed into place, so a crash during a save leaves the previous
      checkpoint whole.
    """

    def __init__(self, *args: Any, loss: Any = None, loss_params: Any = None, ref_model: Any = None,
                 adapter_reference: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.loss_plugin = loss
        self.loss_params = loss_params
        self.ref_model = None
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self.adapter_reference = adapter_reference
        self.last_batch_indices: Any = None
        self.last_losses: Any = None  # the loss plugin's per-example losses of the latest micro-batch
        self.nonfinite_examples: list[Any] | None = None  # set when a micro-batch's loss was not finite
        self.run_loss = RunLoss()

    @property
    def has_reference(self) -> bool:
        return self.ref_model is not None or self.adapter_reference

    def reference_logps(self, model: Any, input_ids: Any, attention_mask: Any, completion_mask: Any) -> Any:
        """Summed completion log-probs under the reference, or ``None`` without one."""
        return self.under_reference(model, lambda m: completion_logps(m, input_ids, attention_mask, completion_mask)[0])

    @torch.no_grad()
    def under_reference(self, model: Any, compute: Any) -> Any:
        """``compute(reference_model)`` without gradients, or ``None`` without a reference."""
        if self.ref_model is not None:
            return compute(self.ref_model)
        if self.adapter_reference:
            with self.accelerator.unwrap_model(model).disable_adapter():
                return compute(model)
        return None

    def apply_loss(self, inputs: Any, batch: int, reward_shapes: dict[str, tuple[int, ...]] | None = None) -> Any:
        """The loss plugin's output on ``inputs``, checked (:func:`molting.losses.check_output`) and kept for the
        non-finite guard, which names the examples whose loss was not finite."""
        from molting.losses import check_output

        out = check_output(self.loss_plugin.compute(inputs, self.loss_params), self.loss_plugin.name, batch,
                           reward_shapes)
        self.last_losses = out.losses.detach()
        return out

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        # a stage whose batches are built later (GRPO: a list of rows) sets the indices in its _prepare_inputs
        self.last_batch_indices = inputs.get("index") if isinstance(inputs, Mapping) else None
        self.last_losses = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():  # the guard skips the optimizer step; gradients may look finite
            self.nonfinite_examples = (self.nonfinite_examples or []) + self._nonfinite_examples()
        else:
            self.run_loss.add(loss, self.args.gradient_accumulation_steps)
        return loss

    def _nonfinite_examples(self) -> list[Any]:
        """The examples of the latest micro-batch whose loss was not finite (all of it when unknown)."""
        indices = self.last_batch_indices
        shown = indices.tolist() if hasattr(indices, "tolist") else ["unknown"]
        losses = self.last_losses
        if losses is None or losses.dim() != 1 or len(shown) != losses.numel():
            return shown
        return [shown[i] for i in (~torch.isfinite(losses)).nonzero().flatten().tolist()] or shown

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f".staging-{name}")
        self.args.output_dir = staging
        try:
            with disk_full_is_an_error(staging, f"{name} in {run_dir}", run_dir):
                super()._save_checkpoint(model, trial)  # writes staging/checkpoint-N
        finally:
            self.args.output_dir = run_dir
        total = self.run_loss.gathered(self.accelerator)  # every process: the loss sum is a collective
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            with disk_full_is_an_error(staging, f"{name} in {run_dir}", run_dir):
                self.run_loss.save(os.path.join(staging, name), total)
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def record(self, metrics: Mapping[str, torch.Tensor | float]) -> None:
        mode = "train" if self.model.training else "eval"
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().reshape(-1)
                value = self.accelerator.gather_for_metrics(value).mean().item()
            self._metrics[mode][name].append(float(value))

    def record_masked(self, metrics: Mapping[str, Any], mask: torch.Tensor, skip_empty: bool = False) -> None:
        """Record ``metrics``; those shaped like ``mask`` as their mean over the masked entries of every process.

        Per-token maps of an online stage (trl's ``entropy``, ``clip_ratio/*``)
        or per-pair values of the pairs a loss kept: processes hold different
        numbers of entries, and a gather needs equal shapes, so each sends its
        sums and its count, in one reduction for all the metrics. With no
        entry on any process the masked ones are recorded as 0, or not at all
        (``skip_empty``). Other values are recorded as :meth:`record` does.
        """
        recorded = {name: value.detach() if isinstance(value, torch.Tensor) else value
                    for name, value in metrics.items()}
        masked = [name for name, value in recorded.items()
                  if isinstance(value, torch.Tensor) and value.shape == mask.shape]
        if masked:
            weights = mask.float()
            sums = torch.stack([(recorded.pop(name).float() * weights).sum() for name in masked] + [weights.sum()])
            total = self.accelerator.reduce(sums, reduction="sum")
            if total[-1] > 0 or not skip_empty:
                recorded.update(zip(masked, (total[:-1] / total[-1].clamp(min=1.0)).tolist()))
        self.record(recorded)

    def prediction_step(self, model: Any, inputs: Any, prediction_loss_only: bool, ignore_keys: Any = None) -> Any:
        """The loss of a held-out batch, its metrics recorded as ``eval_*`` (as trl's trainers evaluate)."""
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        averaged = {name: sum(values) / len(values) for name, values in self._metrics[mode].items() if values}
        if mode == "eval":
            averaged = {f"eval_{name}": value for name, value in averaged.items()}
        logs.update(averaged)
        if "train_loss" in logs:  # the Trainer's covers only the steps since a resume; this one the whole run
            logs["train_loss"] = self.run_loss.mean(self.accelerator)
        super().log(logs, start_time)
        self._metrics[mode].clear()


def uses_bf16(precision: str) -> bool:
    """Whether ``--precision`` means bf16 autocast here; ``auto`` picks it where it is the faster of the two.

    That is a CUDA GPU with bf16, and a CPU whose bf16 instructions (avx512_bf16, AMX) make a bf16 matrix product
    clearly faster than an fp32 one: on an AMD EPYC with avx512_bf16 bf16 autocast trains the demo model 1.8x
    faster, while on an Intel Xeon with avx512_bf16 and no AMX it trains 1.5x slower, so the instructions alone do
    not decide (:func:`cpu_bf16_is_faster` times it). CPUs without them keep fp32.
    """
    if precision != "auto":
        return precision == "bf16"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if torch.backends.mps.is_available():
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None) and cpu_bf16_is_faster()


@functools.cache
def cpu_bf16_is_faster(size: int = 768, repeats: int = 5) -> bool:
    """Whether a ``size``-square matrix product under bf16 autocast takes at most 0.8x the fp32 one on this CPU.

    Timed once per process (about 0.1 s), medians of ``repeats``. The margin keeps the choice stable where the
    two are close: fp32 is kept unless bf16 clearly wins.
    """
    return cpu_matmul_seconds(size, True, repeats) <= 0.8 * cpu_matmul_seconds(size, False, repeats)


def cpu_matmul_seconds(size: int, bf16: bool, repeats: int) -> float:
    """The median time of a ``size``-square matrix product on the CPU, under bf16 autocast or in fp32 (after one
    untimed warm-up product); benchmarks/precision.py prints it for larger sizes."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    times = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for _ in range(repeats + 1):
            started = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def training_arguments(config: RunConfig, output_dir: Path, **overrides: Any) -> TrainingArguments:
    """The ``TrainingArguments`` a stage runs with, from the run's config."""
    use_bf16 = uses_bf16(config.precision)
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
        logging_nan_inf_filter=False,  # a non-finite loss is logged as it is (its step is skipped), not hidden
        seed=config.seed,
        data_seed=config.seed,
        report_to=[] if config.report_to == "none" else [config.report_to],
        remove_unused_columns=False,
        bf16=use_bf16,  # autocast; the weights stay fp32
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # without an accelerator, say so: accelerate then runs several launched processes as MULTI_CPU (gloo)
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        length_column_name="length",
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        optim=config.optim,
        gradient_checkpointing=config.gradient_checkpointing,
        # non-reentrant: works with LoRA (no input that requires grad needed) and with frozen parts of the graph
        gradient_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
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
        if state.is_world_process_zero and logs:
            log_metrics(self.path, state.global_step, logs, self.hook)


def all_finite(tensors: Any) -> bool:
    """Whether every value of ``tensors`` is finite, read from one sum per tensor (one device sync in all).

    A NaN or an infinity anywhere makes its tensor's sum non-finite. Unlike
    ``torch.isfinite(t).all()``, which on CPU allocates a float copy (the
    absolute values) and two masks of each tensor, the sum allocates
    nothing tensor-sized: with a 151,936-token embedding that check alone
    was a 250 MB transient, the largest of a full fine-tuning step. A finite
    tensor whose sum overflows (values near 1e38) counts as non-finite.
    """
    sums = [t.sum(dtype=torch.float32 if t.dtype != torch.float64 else None) for t in tensors]
    return not sums or bool(torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums])).all())


def gradients_are_finite(parameters: Any) -> bool:
    """Whether every gradient is finite (:func:`all_finite`)."""
    return all_finite([p.grad for p in parameters if p.grad is not None])


class NonFiniteGuard(TrainerCallback):
    """Skips an optimizer step whose loss or gradients are not finite, and stops a run whose weights turn so.

    A micro-batch with a non-finite loss (per-example losses of which some
    are NaN can still give finite gradients) or a non-finite gradient drops
    the step's gradients before the step (``p.grad = None``), so the
    optimizer leaves the weights *and* its moments alone. Each skip is logged
    with the step and the examples; after ``max_skipped`` skips in a row the
    run stops with an error naming the last checkpoint written (the last good
    one). Weights that are not finite after a step stop the run at once: it
    never saves them as its result.
    """

    def __init__(self, max_skipped: int) -> None:
        self.max_skipped = max_skipped
        self.in_a_row = 0
        self.trainer: MoltingTrainer | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        bad_loss = self.trainer.nonfinite_examples if self.trainer is not None else None
        if self.trainer is not None:
            self.trainer.nonfinite_examples = None
        if bad_loss is None and gradients_are_finite(model.parameters()):
            self.in_a_row = 0
            return
        for p in model.parameters():
            p.grad = None
        self.in_a_row += 1
        if bad_loss is not None:
            what = f"non-finite loss on the examples {bad_loss}"
        else:
            indices = self.trainer.last_batch_indices if self.trainer is not None else None
            what = f"non-finite gradient on the batch of examples {indices.tolist() if hasattr(indices, 'tolist') else 'unknown'}"
        print(f"molting: step {state.global_step + 1}: {what}; optimizer step skipped ({self.in_a_row} in a row, at "
              f"most {self.max_skipped})", file=sys.stderr)
        if self.in_a_row >= self.max_skipped:
            raise MoltingError(f"{self.in_a_row} optimizer steps in a row were skipped (the last: {what}); stopping. "
                               + _last_good(args.output_dir))

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not all_finite([p.detach() for p in model.parameters() if p.requires_grad]):
            raise MoltingError(f"step {state.global_step + 1} left non-finite weights (a learning rate too large for "
                               "the loss's scale?); stopping without saving them. " + _last_good(args.output_dir))


def _last_good(output_dir: str) -> str:
    last = _last_checkpoint(output_dir)
    return f"The last good checkpoint is {last}." if last else "No checkpoint was written (use --save-steps)."


class LoopEvents:
    """The Trainer's callback events, for a stage that runs its own loop instead of a ``transformers.Trainer``.

    PPO (a rollout, then several optimisation passes) and sample-pairs (no
    training at all) drive their loops themselves; this gives the callbacks
    of :func:`stage_callbacks` — metrics.jsonl and ``molting_on_log``
    included, and every ``molting_trainer_callbacks`` callback — the events a
    Trainer would send, with a ``TrainerState`` whose ``global_step`` counts
    the loop's steps::

        events = LoopEvents(context, max_steps=total)  # before accelerate's Accelerator: see below
        ...
        events.attach(model=policy, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler)
        events.train_begin()
        for step in range(total):
            events.step_begin()
            ...
            events.step_end()
            events.log({"loss": ...})
        events.train_end()

    The ``TrainingArguments`` the callbacks see set up accelerate's state
    when they are built, which resets an ``Accelerator`` made before them:
    build the events first.
    """

    def __init__(self, context: StageContext, max_steps: int, model: Any = None, tokenizer: Any = None,
                 optimizer: Any = None, scheduler: Any = None) -> None:
        from transformers import TrainerControl, TrainerState
        from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

        from molting.context import is_main_process

        self.args = training_arguments(context.config, context.output_dir)
        self.args.device  # noqa: B018 - sets up (and resets) accelerate's state now, not under a later Accelerator
        self.state = TrainerState(max_steps=max_steps, logging_steps=context.config.logging_steps,
                                  is_local_process_zero=is_main_process(), is_world_process_zero=is_main_process())
        self.control = TrainerControl()
        callbacks = [DefaultFlowCallback(), MetricsFile(context.output_dir / "metrics.jsonl", context.host.hook),
                     Heartbeat(context.output_dir / "molting_run.json"), *context.callbacks()]
        self.handler = CallbackHandler(callbacks, model, tokenizer, optimizer, scheduler)

    def attach(self, model: Any = None, tokenizer: Any = None, optimizer: Any = None, scheduler: Any = None) -> None:
        """What the callbacks receive as ``model``, ``processing_class``, ``optimizer`` and ``lr_scheduler``."""
        self.handler.model, self.handler.processing_class = model, tokenizer
        self.handler.optimizer, self.handler.lr_scheduler = optimizer, scheduler

    def _send(self, event: str, **kwargs: Any) -> None:
        self.control = getattr(self.handler, event)(self.args, self.state, self.control, **kwargs)

    def train_begin(self) -> None:
        self._send("on_train_begin")

    def step_begin(self) -> None:
        self._send("on_step_begin")

    def step_end(self) -> None:
        self.state.global_step += 1
        self.state.epoch = self.state.global_step / max(self.state.max_steps, 1)
        self._send("on_step_end")

    def log(self, logs: Mapping[str, float]) -> None:
        """``logs`` at the current step: appended to metrics.jsonl and the state's log history, sent to on_log."""
        logs = dict(logs)
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self._send("on_log", logs=logs)

    def train_end(self) -> None:
        self._send("on_train_end")


def _last_checkpoint(output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


# --------------------------------------------------------------------------- pieces every stage uses


def build_trainer(trainer_class: type, collator: Any, model: Any, tokenizer: Any, examples: Any,
                  config: RunConfig, loss: Any, loss_params: Any, output_dir: Path, callbacks: Any = (),
                  ref_model: Any = None, adapter_reference: bool = False, eval_examples: Any = None) -> MoltingTrainer:
    """A stage's Trainer over tokenized ``examples`` (a ``datasets.Dataset``, or a list of dicts).

    With ``eval_examples`` (tokenized as ``examples`` are, from the held-out
    rows: :func:`held_out_examples`) the Trainer evaluates every
    ``--eval-steps`` steps and :func:`train_and_save` once more at the end
    (``eval_loss`` and the stage's metrics as ``eval_*``, as trl logs them);
    ``--keep-best`` keeps the best evaluation's model (:mod:`molting.watch`).
    """
    import datasets

    from molting.data import is_dataset

    def as_dataset(rows: Any) -> Any:
        return rows if rows is None or is_dataset(rows) else datasets.Dataset.from_list(rows)

    evaluating = {"eval_strategy": "steps", "eval_steps": config.eval_steps} if config.eval_steps and \
        eval_examples is not None else {}
    trainer = trainer_class(
        model=model,
        args=training_arguments(config, output_dir, **evaluating),
        train_dataset=as_dataset(examples),
        eval_dataset=as_dataset(eval_examples),
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        loss=loss,
        loss_params=loss_params,
        ref_model=ref_model,
        adapter_reference=adapter_reference,
    )
    if eval_examples is not None and config.keep_best:
        from molting.watch import BestKeeper, KeepBestCallback

        trainer.add_callback(KeepBestCallback(BestKeeper(config.keep_best, output_dir), trainer))
    return trainer


def held_out_examples(context: StageContext, prepare: Any) -> Any:
    """``prepare(rows, source)`` (the stage's own formatting and tokenizing) of the held-out rows, or ``None``."""
    if context.eval_rows is None:
        return None
    return prepare(context.eval_rows, str(context.eval_data))


def load_policy(context: StageContext, keep_dropout: bool = False) -> tuple[Any, Any]:
    """The model to train and its tokenizer: full weights, LoRA adapters, or QLoRA (4-bit base + LoRA).

    Dropout is off (``--disable-dropout``'s default, as in trl's preference
    trainers) unless the stage keeps it by default (``keep_dropout``, as
    trl's SFT and GRPO trainers do) and the run does not say otherwise.
    """
    from molting.models import apply_lora, check_optimizer, disable_dropout, load_causal_lm, torch_dtype

    config = context.config
    check_memory_settings(config)
    check_optimizer(config.optim)
    model, tokenizer = load_causal_lm(context.model_path, trust_remote_code=config.trust_remote_code,
                                      dtype=torch_dtype(config.dtype), load_in_4bit=config.load_in_4bit,
                                      attn_implementation=config.attn_implementation)
    if hasattr(model, "peft_config"):  # the starting model is a LoRA adapter on a base model
        if config.lora_r:
            raise ConfigError(
                f"{context.model_path} is a LoRA adapter: a new adapter trained on top of it would be saved against "
                "the base model alone. Start from a merged model (rerun that step with --merge) or train every "
                "weight (no --lora-r)"
            )
        model = model.merge_and_unload()  # train every weight of base + adapter
    if config.lora_r:
        from transformers import set_seed

        set_seed(config.seed)  # the adapters' random initialisation is --seed's, whatever ran before in the process
        model = apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    if config.disable_dropout if config.disable_dropout is not None else not keep_dropout:
        disable_dropout(model)
    return model, tokenizer


def check_memory_settings(config: RunConfig) -> None:
    """The memory settings that cannot go together, refused before any model loads."""
    if config.load_in_4bit and not config.lora_r:
        raise ConfigError("--load-in-4bit freezes the base model in 4 bits: give --lora-r to train LoRA adapters on it")
    if config.merge and not config.lora_r:
        raise ConfigError("--merge merges a LoRA adapter: give --lora-r")
    if config.dtype == "float16" and not config.lora_r and not torch.cuda.is_available():
        raise ConfigError("--dtype float16 trains every weight in float16, which needs a GPU's loss scaling: use "
                          "--dtype bfloat16 here, or LoRA (--lora-r), whose adapters stay float32")


def make_optimizer(parameters: Any, config: RunConfig, **kwargs: Any) -> Any:
    """The ``--optim`` optimizer over ``parameters``, for a stage with its own loop (the Trainer builds its own)."""
    from molting.models import check_optimizer

    check_optimizer(config.optim)
    if config.optim in TORCH_OPTIMIZERS:
        return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay,
                                 fused=config.optim == "adamw_torch_fused", **kwargs)
    import bitsandbytes as bnb

    kind = bnb.optim.PagedAdamW8bit if config.optim == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return kind(parameters, lr=config.learning_rate, weight_decay=config.weight_decay, **kwargs)


def enable_gradient_checkpointing(*models: Any) -> None:
    """``--gradient-checkpointing`` for a stage with its own loop: non-reentrant, as the Trainer sets it."""
    for model in models:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def reference_for(model: Any, context: StageContext, needed: bool | None = None) -> tuple[Any, bool, str]:
    """``(ref_model, adapter_reference, description)`` for a stage's loss.

    No reference when the loss needs none (or ``needed`` is false, for a stage
    that decides itself); with LoRA, the policy with its adapter disabled (no
    second copy of the weights); otherwise a frozen copy.
    """
    import copy

    if needed is None:
        needed = context.loss is not None and context.loss.needs_reference
    if not needed:
        return None, False, "none"
    if context.config.lora_r:
        return None, True, "the base model (adapter disabled)"
    return copy.deepcopy(model), False, "frozen copy"


def stage_callbacks(context: StageContext) -> list[Any]:
    """metrics.jsonl, the record's heartbeat, the non-finite guard, and the callbacks plugins add."""
    return [
        MetricsFile(context.output_dir / "metrics.jsonl", context.host.hook),
        Heartbeat(context.output_dir / "molting_run.json"),
        NonFiniteGuard(context.config.max_skipped_steps),
        *context.callbacks(),
    ]


class Heartbeat(TrainerCallback):
    """Keeps ``molting_run.json``'s ``heartbeat`` (UTC, ISO 8601) fresh while a run trains: at most every
    :attr:`interval` seconds, at the end of a step, on the main process. A ``running`` record whose heartbeat is
    old, or whose ``pid`` is gone from its ``host``, was killed."""

    interval = float(os.environ.get("MOLTING_HEARTBEAT_SECONDS", "30"))

    def __init__(self, record: Path) -> None:
        self.record = record
        self.last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            beat(self.record)


def beat(record: Path) -> None:
    """Set a running record's ``heartbeat`` to now."""
    try:
        current = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return
    if current.get("status") == "running":
        write_json_atomic(record, {**current, "heartbeat": now_utc()})


def announce(trainer: MoltingTrainer, what: str, reference: str) -> None:
    args = trainer.args
    print(
        f"molting: world size {args.world_size} (this is process {args.process_index}), device {args.device}, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, {parallelism(trainer.accelerator)}, {what}, "
        f"reference model: {reference}",
        file=sys.stderr,
    )


def gather_rows(accelerator: Any, values: Any) -> Any:
    """Every process's ``(B, T)`` rows in process order, padded with zeros to the widest T (an online stage's
    per-token tensors: completions differ in length across processes)."""
    if accelerator.num_processes > 1:
        values = accelerator.pad_across_processes(values, dim=1, pad_index=0)
    return accelerator.gather(values)


def parallelism(accelerator: Any) -> str:
    """How the processes share the work (``DDP``, ``FSDP 2``, ``DeepSpeed ZeRO-3``, ``one process``), for the
    start line; a warning when the launcher asked for sharding that accelerate did not set up (it shards only
    on GPUs and the like: on CPU an FSDP or ZeRO config runs as plain data parallel)."""
    import os

    kind = accelerator.distributed_type.value
    if kind == "FSDP":
        shown = f"FSDP {getattr(accelerator.state.fsdp_plugin, 'fsdp_version', '')}".strip()
    elif kind == "DEEPSPEED":
        shown = f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    else:
        shown = "one process" if accelerator.num_processes == 1 else "DDP"
    for flag, name, wanted in (("ACCELERATE_USE_FSDP", "FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed",
                                                                        "DEEPSPEED")):
        if os.environ.get(flag, "false").lower() == "true" and kind != wanted and accelerator.is_main_process:
            print(f"molting: warning: the launcher asked for {name}, but accelerate set up {kind} on "
                  f"{accelerator.device}: nothing is sharded, every process holds the whole model (accelerate "
                  f"shards only on GPUs and the like)", file=sys.stderr)
    return shown


def train_and_save(trainer: MoltingTrainer, tokenizer: Any, context: StageContext, save: Any = None) -> dict[str, Any]:
    """Train (resuming if asked), save the result, and return the final metrics.

    ``save()`` replaces :func:`save_final` for a stage that saves its model its own way.
    """
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, NonFiniteGuard):
            callback.trainer = trainer
    checkpoint = resume_checkpoint(context.config, context.output_dir)
    if checkpoint is not None:
        trainer.run_loss.load(checkpoint)
    if checkpoint is not None and _finished(trainer, checkpoint):
        result_metrics: dict[str, Any] = {"train_loss": trainer.run_loss.mean(trainer.accelerator)}
    else:
        result_metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
    if trainer.eval_dataset is not None:
        result_metrics.update(_final_evaluation(trainer))
    if save is not None:
        save()
    else:
        save_final(trainer, tokenizer, context.output_dir, merge=context.config.merge,
                   trust_remote_code=context.config.trust_remote_code)
    return {**last_values(trainer.state.log_history), **result_metrics}


def _final_evaluation(trainer: MoltingTrainer) -> dict[str, Any]:
    """The held-out figures of the trained model (an evaluation at the last step, unless one ran there), and the
    best model ``--keep-best`` kept (``best``)."""
    done = [log for log in trainer.state.log_history if "eval_loss" in log and log.get("step") == trainer.state.global_step]
    metrics = {k: v for k, v in done[-1].items() if k.startswith("eval_")} if done else trainer.evaluate()
    from molting.watch import KeepBestCallback

    keepers = [c for c in trainer.callback_handler.callbacks if isinstance(c, KeepBestCallback)]
    return {**metrics, **({"best": keepers[0].keeper.summary()} if keepers else {})}


def _finished(trainer: MoltingTrainer, checkpoint: str) -> bool:
    """Whether ``checkpoint`` is at (or past) ``--max-steps`` already; if so, its weights and state are loaded
    into ``trainer``, to be saved as the result. The Trainer would otherwise train one step more."""
    from transformers import TrainerState

    state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    if trainer.args.max_steps <= 0 or state.global_step < trainer.args.max_steps:
        return False
    print(f"molting: {checkpoint} is at step {state.global_step} of --max-steps {trainer.args.max_steps}: nothing "
          "left to train; it is the result", file=sys.stderr)
    trainer._load_from_checkpoint(checkpoint)  # the weights (or the adapter), as train() loads them
    trainer.state = state
    return True


def resume_checkpoint(config: RunConfig, output_dir: Path) -> str | None:
    """The checkpoint ``--resume`` names (``auto``: the latest one in the output dir, if any)."""
    if not config.resume:
        return None
    if config.resume == "auto":
        found = _last_checkpoint(str(output_dir))
        if found is None:
            _trim_metrics(Path(output_dir) / "metrics.jsonl", 0)  # nothing to resume: a fresh run, fresh metrics
            return None
        path = Path(found)
    else:
        path = Path(config.resume)
        if not (path / "trainer_state.json").exists():
            raise ConfigError(f"--resume {config.resume}: not a checkpoint directory (no trainer_state.json)")
    step = json.loads((path / "trainer_state.json").read_text())["global_step"]
    _trim_metrics(Path(output_dir) / "metrics.jsonl", step)
    print(f"molting: resuming from {path} (step {step})", file=sys.stderr)
    return str(path)


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics.jsonl records up to ``step``: the resumed run logs the later ones again."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the crash
        if record.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def save_final(trainer: Trainer, tokenizer: Any, output_dir: Path, merge: bool = False, trust_remote_code: bool = False) -> None:
    """Save the trained model and tokenizer as plain transformers files (safetensors), staged (:func:`staged`).

    A LoRA run saves its adapter; with ``merge``, the adapter goes to
    ``OUTPUT/adapter`` and ``OUTPUT`` gets the base model with the adapter
    merged in. The Trainer also pickles its arguments to training_args.bin;
    the run's settings are in molting_run.json, so the pickle is removed and
    the saved model needs no unpickling (checkpoints keep the Trainer's own
    torch-saved state, for --resume).
    """
    with staged(Path(output_dir), trainer.is_world_process_zero()) as staging:
        target = staging / "adapter" if merge else staging
        trainer.save_model(str(target))
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(target))
            for folder in {target, staging}:
                (folder / "training_args.bin").unlink(missing_ok=True)
            if merge:
                from molting.models import merge_adapter

                merge_adapter(target, staging, trust_remote_code=trust_remote_code)


@contextlib.contextmanager
def staged(output_dir: Path, is_main: bool = True) -> Iterator[Path]:
    """A folder to write the final model into, whose files are renamed into ``output_dir`` once all are written.

    A crash or kill during the save leaves the output directory as it was
    (and ``molting_run.json`` not ``completed``), never half a model next
    to the record; the next attempt clears the staging folder first.
    """
    staging = output_dir / ".staging-final"
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    with disk_full_is_an_error(staging, f"the model in {output_dir}", output_dir):
        yield staging
    if not is_main:
        return
    for entry in sorted(staging.iterdir()):
        destination = output_dir / entry.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(entry, destination)
    staging.rmdir()


@contextlib.contextmanager
def disk_full_is_an_error(staging: Path | str, what: str, output_dir: Path | str) -> Iterator[None]:
    """``ENOSPC`` while writing into ``staging`` becomes a :class:`DiskFullError` naming ``what`` and the last whole
    checkpoint; the staging folder is removed (it is half written, and the space it holds is what is missing)."""
    import errno

    from molting.errors import DiskFullError

    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        shutil.rmtree(staging, ignore_errors=True)
        last = _last_checkpoint(str(output_dir))
        kept = f"{Path(last).name} is whole" if last else "no checkpoint was written before"
        raise DiskFullError(f"the disk is full: writing {what} failed ({exc.strerror}); nothing half-written is "
                            f"kept and {kept}. Free space, then rerun with --resume auto") from exc


def last_values(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """The last logged value of every metric in a Trainer's log history."""
    merged: dict[str, Any] = {}
    for entry in log_history:
        merged.update(entry)
    return merged


def save_final_model(model: Any, tokenizer: Any, output_dir: Path, is_main_process: bool = True, merge: bool = False,
                     trust_remote_code: bool = False) -> None:
    """:func:`save_final` for stages with their own loop: the model (or its LoRA adapter) and the tokenizer."""
    if not is_main_process:
        return
    with staged(Path(output_dir)) as staging:
        target = staging / "adapter" if merge else staging
        model.save_pretrained(str(target), safe_serialization=True)
        tokenizer.save_pretrained(str(target))
        if merge:
            from molting.models import merge_adapter

            merge_adapter(target, staging, trust_remote_code=trust_remote_code)


# --------------------------------------------------------------------------- checkpoints of a stage's own loop


def save_loop_checkpoint(output_dir: Path, step: int, models: Mapping[str, Any], state: Mapping[str, Any],
                         save_total_limit: int | None = None) -> Path:
    """``OUTPUT/checkpoint-STEP`` for a stage that runs its own loop (PPO), staged and renamed as the Trainer's are.

    Each of ``models`` keeps its trainable parameters in ``NAME.safetensors``
    (a LoRA run: the adapter only); ``state`` (optimizer and scheduler state
    dicts, counters, the data order, ...) goes to ``loop_state.pt`` with the
    random number generators' states, and ``trainer_state.json`` holds
    ``global_step``, so ``--resume auto`` finds the checkpoint as it finds a
    Trainer's (:func:`resume_checkpoint`). Only the main process writes.
    """
    from safetensors.torch import save_file
    from transformers.trainer_utils import rotate_checkpoints

    name = f"checkpoint-{step}"
    staging, final = output_dir / f".staging-{name}", output_dir / name
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with disk_full_is_an_error(staging, f"{name} in {output_dir}", output_dir):
        for model_name, model in models.items():
            save_file(_trainable_state(model), str(staging / f"{model_name}.safetensors"))
        torch.save({**state, "rng": _rng_states()}, staging / "loop_state.pt")
        write_json_atomic(staging / "trainer_state.json", {"global_step": step})
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    rotate_checkpoints(str(output_dir), save_total_limit)
    return final


def load_loop_checkpoint(checkpoint: str | Path, models: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`save_loop_checkpoint` wrote: ``models``' parameters loaded in place, the generators' states
    restored, and the ``state`` returned."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    for model_name, model in models.items():
        saved = load_file(str(checkpoint / f"{model_name}.safetensors"))
        if set(saved) != {name for name, p in model.named_parameters() if p.requires_grad}:
            raise ConfigError(f"--resume {checkpoint}: {model_name}.safetensors holds other parameters than this run "
                              "trains (another model, or LoRA settings)")
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if parameter_name in saved:
                    parameter.copy_(saved[parameter_name])
    state = torch.load(checkpoint / "loop_state.pt", weights_only=True)
    _restore_rng(state.pop("rng"))
    return state


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The parameters that train, each once (a tied embedding is one parameter), detached and contiguous."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def _rng_states() -> dict[str, Any]:
    """torch's and Python's random states (what a loop's sampling and shuffling draw from; numpy's would need an
    unpickler that runs code to load)."""
    import random

    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: Mapping[str, Any]) -> None:
    import random

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
