"""The ``reward-model`` stage and its ``bradley-terry`` loss: a scalar reward model from preference pairs.

The model is a sequence classifier with one output (``AutoModelForSequenceClassification``,
``num_labels=1``) initialised from the run's causal LM: its body is the
language model's, its score head new. The reward of a prompt and completion
is the head's output at the sequence's last token. Data is the preference
stage's (prompt/chosen/rejected, standard or conversational, the prompt
implicit when missing) with an optional numeric ``margin`` column: how much
better chosen is than rejected.

Each step runs ``[chosen; rejected]`` through the model in one forward and
hands the two rewards to the loss. The ``bradley-terry`` loss is trl's
``RewardTrainer`` loss (Ouyang et al., 2022, arXiv:2203.02155; with the margin of
Touvron et al., 2023, arXiv:2307.09288; and the reward centering of Eisenstein
et al., 2023, arXiv:2312.09244), per pair:

    loss = -log σ(r_w − r_l − m) + c·(r_w + r_l)²

``m`` is the row's margin (0 without the column) and ``c`` the
``center_rewards_coefficient`` (off by default), which pulls the rewards
towards a zero mean. The stage averages the per-pair losses, so the loss is
trl's ``-mean log σ(...) + c·mean((r_w + r_l)²)``. Logged under trl's names:
``accuracy`` (share of pairs with r_w > r_l), ``margin`` (mean r_w − r_l),
``min_reward`` / ``mean_reward`` / ``max_reward`` (over both sides of every
pair on every process) and ``num_tokens`` (tokens seen so far).

On the built-in demo data the stage then scores the held-out pairs of
``demo-preference`` and returns their pairwise accuracy as ``eval_accuracy``.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any

import attrs

import molting
from molting.context import StageContext
from molting.data import Rows

if TYPE_CHECKING:  # pragma: no cover - typing only
    import datasets
from molting.components import Loss, LossOutput, RewardInputs, Stage

SCHEMAS = (("prompt", "chosen", "rejected"), ("chosen", "rejected"))
METRICS = ("loss", "accuracy", "margin", "min_reward", "mean_reward", "max_reward", "num_tokens")
DEMO_TEST_SOURCE = "demo-preference (test split)"


# --------------------------------------------------------------------------- the loss


def _optional_number(value: Any) -> Any:
    """``None``, or a float (YAML reads ``1e-2`` as a string, so numeric strings are accepted)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"expected a number or None, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number or None, got {value!r}") from None


def _non_negative_finite(instance: Any, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{attribute.name} must be a finite number >= 0 (trl suggests 0.01) or None, got {value!r}")


@attrs.frozen
class BradleyTerryParams:
    center_rewards_coefficient: float | None = attrs.field(
        default=None, converter=_optional_number, validator=_non_negative_finite
    )
    """Weight c of the centering term c·(r_w + r_l)², which keeps the rewards' mean near 0; None (off) as in trl,
    which suggests 0.01 when it is used."""


def bradley_terry_loss(inputs: RewardInputs, params: BradleyTerryParams) -> LossOutput:
    import torch.nn.functional as F

    chosen, rejected = inputs.chosen_rewards, inputs.rejected_rewards
    difference = chosen - rejected
    if inputs.margin is not None:
        difference = difference - inputs.margin
    losses = -F.logsigmoid(difference)
    if params.center_rewards_coefficient is not None:
        losses = losses + params.center_rewards_coefficient * (chosen + rejected) ** 2
    return LossOutput(losses=losses, chosen_rewards=chosen, rejected_rewards=rejected)


@molting.hookimpl
def molting_register_losses(register):
    register(
        Loss(
            name="bradley-terry",
            compute=bradley_terry_loss,
            params=BradleyTerryParams,
            stage="reward-model",
            description="Bradley-Terry reward-model loss -log σ(r_w − r_l − margin), optional reward centering (trl).",
            needs_reference=False,
        )
    )


@molting.hookimpl
def molting_register_stages(register):
    register(
        Stage(
            name="reward-model",
            run=run_reward_model,
            description="Trains a scalar reward model (sequence classifier) on prompt/chosen/rejected pairs.",
            columns=SCHEMAS[0],
            default_loss="bradley-terry",
            default_data="demo-preference",
            metrics=METRICS,
            inputs=molting.RewardInputs,
            produces="reward-model",
            # 1 epoch of the 512 demo pairs at 1e-4: 0.81 held-out accuracy, as 3 epochs at 5e-5 (docs/reward-model.md)
            demo_defaults={"learning_rate": 1e-4, "epochs": 1.0},
        )
    )


# --------------------------------------------------------------------------- data


def format_reward_pairs(rows: Rows, tokenizer: Any, source: str, num_proc: int | None = None) -> datasets.Dataset:
    """The preference stage's formatted pairs, each with its ``margin`` when the data has that column."""
    from molting.data import column_names, iter_rows
    from molting.errors import DataError
    from molting.pairs import format_pairs

    if "margin" not in column_names(rows):
        return format_pairs(rows, tokenizer, source, num_proc=num_proc)
    for index, row in enumerate(iter_rows(rows, ("margin",))):
        value = row.get("margin")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            shown = "missing" if "margin" not in row else f"got {value!r}"[:80]
            raise DataError(
                f"{source}, row {index}, field 'margin': expected a finite number (how much better chosen is than "
                f"rejected), as every row needs once one has a margin; {shown}. CSV files hold only strings: use "
                "JSONL, JSON or parquet for margins."
            )
    return format_pairs(rows, tokenizer, source, carry=("margin",), num_proc=num_proc)


def tokenize_reward_pairs(
    pairs: Rows, tokenizer: Any, max_length: int, overlong: str, source: str = "data", num_proc: int | None = None
) -> datasets.Dataset:
    """Token ids of each pair as the preference stage tokenizes them, its ``margin`` carried along."""
    from molting.data import column_names
    from molting.tokenization import tokenize_completions

    carry = ("margin",) if "margin" in column_names(pairs) else ()
    return tokenize_completions(pairs, ("chosen", "rejected"), tokenizer, max_length, overlong, source, noun="pair",
                                carry=carry, num_proc=num_proc)


class RewardCollator:
    """trl's reward batch: ``input_ids`` / ``attention_mask`` of the chosen sequences then the rejected ones
    (prompt + completion, right-padded), ``margin`` when the pairs have one, and ``index``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch
        from trl.trainer.reward_trainer import DataCollatorForPreference

        pairs = []
        for ex in examples:
            pair = {"chosen_ids": ex["prompt_ids"] + ex["chosen_ids"], "rejected_ids": ex["prompt_ids"] + ex["rejected_ids"]}
            if "margin" in ex:
                pair["margin"] = ex["margin"]
            pairs.append(pair)
        batch = DataCollatorForPreference(pad_token_id=self.pad_token_id)(pairs)
        if "index" in examples[0]:
            batch["index"] = torch.tensor([ex["index"] for ex in examples])
        return batch


# --------------------------------------------------------------------------- the model


def load_reward_model(context: StageContext) -> tuple[Any, Any]:
    """A one-output sequence classifier from the run's model directory, and its tokenizer.

    A causal LM gets a new, randomly initialised score head (seeded with the
    run's seed); a reward model keeps its own. ``config.pad_token_id`` is set,
    so that batched scoring finds each sequence's last token, and dropout is
    switched off, as trl's ``RewardTrainer`` does by default.
    """
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning
    from molting.errors import ConfigError, ModelError
    from molting.models import apply_lora, check_optimizer, disable_dropout, load_tokenizer, torch_dtype
    from molting.training import check_memory_settings

    config, path = context.config, context.model_path
    if config.load_in_4bit:
        raise ConfigError("--load-in-4bit (QLoRA) is not supported by the reward-model stage: drop it")
    check_memory_settings(config)
    check_optimizer(config.optim)
    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        raise ModelError(
            f"{path} holds a LoRA adapter; the reward-model stage starts from full weights: "
            "train the previous step with --merge, or give the merged model with --model"
        )
    if not (path / "config.json").exists():
        raise ModelError(f"{path} has no config.json: not a transformers model directory")
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"{path} has no .safetensors weights; molting loads weights as safetensors only")
    set_seed(config.seed)
    try:
        with suppress_seqcls_warning():
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, use_safetensors=True, trust_remote_code=config.trust_remote_code,
                dtype=torch_dtype(config.dtype),
                **({"attn_implementation": config.attn_implementation} if config.attn_implementation else {}),
            )
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"cannot load {path} as a sequence classifier (AutoModelForSequenceClassification): {first}") from exc
    tokenizer = load_tokenizer(path, config.trust_remote_code)
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if config.disable_dropout is not False:  # as trl's RewardTrainer does by default (disable_dropout=True)
        disable_dropout(model)
    if config.lora_r:  # adapters on the body; the new score head is trained in full
        model = apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules,
                           task_type="SEQ_CLS", modules_to_save=["score"])
    return model, tokenizer


def save_reward_model(trainer: Any, tokenizer: Any, output_dir: Any, merge: bool) -> None:
    """Save a LoRA-trained reward model as plain weights (adapter merged), loadable with
    ``AutoModelForSequenceClassification``; with ``merge`` the adapter also goes to ``OUTPUT/adapter``."""
    from pathlib import Path

    from molting.training import staged

    model = trainer.accelerator.unwrap_model(trainer.model)
    with staged(Path(output_dir), trainer.is_world_process_zero()) as staging:
        if merge:
            trainer.save_model(str(staging / "adapter"))
            (staging / "adapter" / "training_args.bin").unlink(missing_ok=True)
        if trainer.is_world_process_zero():
            import copy

            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            (staging / "training_args.bin").unlink(missing_ok=True)


# --------------------------------------------------------------------------- training


def build_trainer(model, tokenizer, examples, config, loss, loss_params, output_dir, callbacks=(), eval_examples=None):
    """The reward-model Trainer for tokenized ``examples`` (see :func:`tokenize_reward_pairs`)."""
    from molting import training

    from .trainer import RewardTrainer

    return training.build_trainer(RewardTrainer, RewardCollator(tokenizer.pad_token_id), model, tokenizer,
                                  examples, config, loss, loss_params, output_dir, callbacks,
                                  eval_examples=eval_examples)


def score_pairs(model: Any, examples: Rows, pad_token_id: int, batch_size: int = 32) -> tuple[Any, Any]:
    """The rewards of the chosen and the rejected side of tokenized pairs, in evaluation mode, on the model's device."""
    import torch

    from molting.data import batches

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collator = RewardCollator(pad_token_id)
    chosen, rejected = [], []
    with torch.no_grad():
        for chunk in batches(examples, batch_size, ("prompt_ids", "chosen_ids", "rejected_ids")):
            batch = collator(chunk)
            rewards = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                            use_cache=False).logits.squeeze(-1).float().cpu()
            chosen.append(rewards[: len(chunk)])
            rejected.append(rewards[len(chunk) :])
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def demo_held_out_accuracy(model: Any, tokenizer: Any, config: Any) -> float:
    """Pairwise accuracy (share of pairs with r_w > r_l) on the held-out ``test`` split of ``demo-preference``."""
    from molting import demo

    pairs = format_reward_pairs(demo.preference_rows("test"), tokenizer, DEMO_TEST_SOURCE)
    examples = tokenize_reward_pairs(pairs, tokenizer, config.max_length, "truncate", DEMO_TEST_SOURCE)
    chosen, rejected = score_pairs(model, examples, tokenizer.pad_token_id, batch_size=max(config.batch_size, 32))
    return (chosen > rejected).float().mean().item()


def run_reward_model(context: StageContext) -> dict[str, Any]:
    from molting.errors import ConfigError
    from molting.training import announce, held_out_examples, stage_callbacks, train_and_save

    config = context.config
    if config.padding_free:
        raise ConfigError("--padding-free is not supported by the reward-model stage yet: drop it (batches are padded)")
    model, tokenizer = load_reward_model(context)

    def prepare(rows: Any, source: str) -> Any:
        pairs = format_reward_pairs(rows, tokenizer, source, config.num_proc)
        return tokenize_reward_pairs(pairs, tokenizer, config.max_length, config.overlong, source, config.num_proc)

    examples, eval_examples = prepare(context.rows, context.data_source), held_out_examples(context, prepare)
    trainer = build_trainer(model, tokenizer, examples, config, context.loss, context.loss_params, context.output_dir,
                            stage_callbacks(context), eval_examples)
    margins = " with margins" if "margin" in examples[0] else ""
    announce(trainer, f"{len(examples)} pairs{margins}, reward model {type(trainer.model).__name__}", "none")
    # a LoRA reward model is saved merged, as plain weights (save_reward_model)
    save = (lambda: save_reward_model(trainer, tokenizer, context.output_dir, config.merge)) if config.lora_r else None
    metrics = train_and_save(trainer, tokenizer, context, save=save)
    if context.data.demo:
        accuracy = demo_held_out_accuracy(trainer.model, tokenizer, config)
        metrics["eval_accuracy"] = accuracy
        if trainer.is_world_process_zero():
            print(f"molting: reward model held-out pairwise accuracy on {DEMO_TEST_SOURCE}, 256 pairs: {accuracy:.4f}",
                  file=sys.stderr)
    return metrics
