"""The ``unpaired`` stage: prompt/completion/label data, a policy and a frozen reference (KTO and its kin).

Each row is a prompt, one completion and a boolean ``label``: ``true`` for a
desirable completion, ``false`` for an undesirable one. Values are strings
(standard) or message lists (conversational, rendered with the tokenizer's
chat template). Paired prompt/chosen/rejected rows are unpaired
automatically with trl's ``_unpair_row``: each pair becomes a desirable and
an undesirable example.

Each step computes the policy's and the reference's summed completion
log-probs, and the reference point of KTO exactly as trl's ``KTOTrainer``
does: each prompt of the batch is paired with the completion of the example
before it (``(x₁, y_n), (x₂, y₁), …, (x_n, y_{n−1})``), and the mean of
log π − log π_ref over those mismatched pairs, detached, averaged across
processes and clamped at 0, is the KL estimate handed to the loss. trl
rotates the completions when it prepares the dataset, which forces it to
sample batches in order; molting rotates them inside each batch (as trl's
vision-language collator does), so the data may be shuffled.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import molting
from molting.components import Stage
from molting.context import StageContext
from molting.data import Rows

if TYPE_CHECKING:  # pragma: no cover - typing only
    import datasets

SCHEMAS = (("prompt", "completion", "label"), ("prompt", "chosen", "rejected"), ("chosen", "rejected"))
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "kl",
    "count/chosen",
    "count/rejected",
)


@molting.hookimpl
def molting_register_stages(register):
    register(
        Stage(
            name="unpaired",
            run=run_unpaired,
            description="Offline alignment on prompt/completion rows labelled desirable or not (KTO).",
            columns=SCHEMAS[0],
            default_loss="kto",
            default_data="demo-unpaired",
            metrics=METRICS,
            inputs=molting.UnpairedInputs,
        )
    )


# --------------------------------------------------------------------------- data


def format_unpaired(rows: Rows, tokenizer: Any, source: str, num_proc: int | None = None) -> datasets.Dataset:
    """Validated rows as prompt/completion strings with a bool label (chat template applied).

    Paired rows (prompt/chosen/rejected, or chosen/rejected with the prompt
    implicit) are formatted as the preference stage does, then unpaired.
    """
    from molting.data import check_columns, check_text_fields, iter_rows
    from molting.errors import DataError
    from molting.tokenization import map_rows

    schema = check_columns(rows, SCHEMAS, source, "unpaired")
    if "label" not in schema:
        from molting.pairs import format_pairs

        pairs = format_pairs(rows, tokenizer, source, stage="unpaired", num_proc=num_proc)
        print(
            f"molting: {source} is paired (prompt/chosen/rejected): unpaired into {len(pairs)} desirable "
            f"and {len(pairs)} undesirable examples",
            file=sys.stderr,
        )
        # 1,000 pairs a batch, each batch's chosen sides then its rejected ones: the order trl's unpairing gives
        return map_rows(pairs, _unpair_batch, "unpairing pairs", num_proc, batch_size=1000,
                        columns=("prompt", "chosen", "rejected", "templated"))

    conversational = check_text_fields(rows, ("prompt", "completion"), source)
    for index, row in enumerate(iter_rows(rows, ("label",))):
        if not isinstance(row.get("label"), bool):
            shown = repr(row.get("label"))
            shown = shown if len(shown) < 80 else shown[:77] + "..."
            raise DataError(
                f"{source}, row {index}, field 'label': expected a boolean (true for a desirable completion, "
                f"false for an undesirable one); got {shown}. CSV files hold only strings: use JSONL, JSON or "
                "parquet for unpaired data."
            )
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source} is conversational (message lists) but the model's tokenizer has no chat template")
    return map_rows(rows, _format_unpaired_batch, "formatting examples", num_proc,
                    columns=("prompt", "completion", "label"), conversational=conversational,
                    tokenizer=tokenizer, source=source)


def _unpair_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
    """trl's ``_unpair_row`` of a batch of formatted pairs: each pair's chosen side desirable, its rejected side
    undesirable."""
    from trl.data_utils import _unpair_row

    columns = _unpair_row({key: batch[key] for key in ("prompt", "chosen", "rejected")})
    return {"prompt": columns["prompt"], "completion": columns["completion"],
            "label": [bool(label) for label in columns["label"]], "templated": batch["templated"] * 2}


def _format_unpaired_batch(batch: dict[str, list], indices: list[int], *, conversational: bool, tokenizer: Any,
                           source: str) -> dict[str, list]:
    from molting.pairs import render_chat

    out: dict[str, list] = {"prompt": [], "completion": [], "label": [], "templated": []}
    for offset, index in enumerate(indices):
        text = {"prompt": batch["prompt"][offset], "completion": batch["completion"][offset]}
        if conversational:
            text = render_chat(text, tokenizer, f"{source}, row {index}")
        out["prompt"].append(text["prompt"])
        out["completion"].append(text["completion"])
        out["label"].append(batch["label"][offset])
        out["templated"].append(conversational)
    return out


def tokenize_unpaired(
    examples: Rows, tokenizer: Any, max_length: int, overlong: str, source: str = "data", num_proc: int | None = None
) -> datasets.Dataset:
    """Token ids (``prompt_ids``, ``completion_ids``) and ``label`` of each example, as the preference stage tokenizes."""
    from molting.tokenization import tokenize_completions

    return tokenize_completions(
        examples, ("completion",), tokenizer, max_length, overlong, source, noun="example", carry=("label",),
        num_proc=num_proc,
    )


def imbalance_warning(
    labels: list[bool], desirable_weight: float, undesirable_weight: float, source: str = "the data"
) -> str | None:
    """trl's KTO class-balance warning, or ``None`` when the weights suit the data.

    The rule is trl's (``KTOTrainer._prepare_dataset``), from Eq. (8) of the
    KTO paper: with different numbers of desirable and undesirable examples,
    λ_D·n_D / (λ_U·n_U) should lie in [1, 4/3] (trl uses 1.33). It warns when
    neither weight lies in the range that would satisfy this with the other
    one fixed, each bound rounded to two decimals, as trl rounds them.
    """
    # trl clamps both counts at 1 (the second from the clamped first); kept as is, so the warnings match
    num_desirable = max(sum(bool(label) for label in labels), 1)
    num_undesirable = max(len(labels) - num_desirable, 1)
    if num_desirable == num_undesirable:
        return None
    des_lower = round((num_undesirable * undesirable_weight / num_desirable) * 1, 2)
    des_upper = round((num_undesirable * undesirable_weight / num_desirable) * 1.33, 2)
    und_lower = round((num_desirable * desirable_weight / num_undesirable) / 1.33, 2)
    und_upper = round((num_desirable * desirable_weight / num_undesirable) / 1, 2)
    if des_lower <= desirable_weight <= des_upper or und_lower <= undesirable_weight <= und_upper:
        return None
    n_desirable = sum(bool(label) for label in labels)
    return (
        f"molting: warning: {source} has {n_desirable} desirable and {len(labels) - n_desirable} undesirable "
        "examples, but the weights on the desirable and undesirable losses "
        f"(desirable_weight={desirable_weight:g}, undesirable_weight={undesirable_weight:g}) don't seem to be in "
        "an ideal range. Based on your data, we recommend EITHER "
        f"desirable_weight in [{des_lower}, {des_upper}] or undesirable_weight in [{und_lower}, {und_upper}] "
        f"(but NOT BOTH), e.g. --set desirable_weight={des_lower}. The KTO paper (arXiv:2402.01306, Eq. 8) keeps "
        "desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]."
    )


class UnpairedCollator:
    """Pads tokenized examples into trl's KTO batch, with the mismatched KL sequences built within the batch.

    The KL completion of example ``i`` is the completion of example ``i − 1``
    (the first takes the last's), as trl pairs them; the batch is trl's
    ``DataCollatorForUnpairedPreference`` output: ``input_ids``,
    ``attention_mask``, ``completion_mask``, the same three prefixed ``KL_``,
    and ``label`` (a bool tensor). ``max_length`` cuts the KL sequences,
    whose completion comes from another example, from their end.
    """

    def __init__(self, pad_token_id: int, max_length: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.max_length = max_length

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

        import torch

        indices = [ex["index"] for ex in examples] if "index" in examples[0] else None
        completions = [ex["completion_ids"] for ex in examples]
        rotated = completions[-1:] + completions[:-1]
        examples = [
            {"prompt_ids": ex["prompt_ids"], "completion_ids": ex["completion_ids"], "KL_completion_ids": kl,
             "label": bool(ex["label"])}
            for ex, kl in zip(examples, rotated)
        ]
        batch = DataCollatorForUnpairedPreference(pad_token_id=self.pad_token_id, max_length=self.max_length)(examples)
        if indices is not None:
            batch["index"] = torch.tensor(indices)
        return batch


# --------------------------------------------------------------------------- training


def build_trainer(model, tokenizer, examples, config, loss, loss_params, output_dir, callbacks=(), ref_model=None,
                  adapter_reference=False, eval_examples=None):
    """The unpaired Trainer for tokenized ``examples`` (see :func:`tokenize_unpaired`)."""
    from molting import training

    collator = UnpairedCollator(tokenizer.pad_token_id, config.max_length)
    from .trainer import UnpairedTrainer

    return training.build_trainer(UnpairedTrainer, collator, model, tokenizer, examples, config, loss,
                                  loss_params, output_dir, callbacks, ref_model, adapter_reference, eval_examples)


def run_unpaired(context: StageContext) -> dict[str, Any]:
    from molting.errors import ConfigError
    from molting.training import announce, held_out_examples, load_policy, reference_for, stage_callbacks, train_and_save

    config = context.config
    if config.padding_free:
        raise ConfigError("--padding-free is not supported by the unpaired stage yet: drop it (batches are padded; "
                          "--group-by-length also cuts padding)")
    if context.loss.needs_reference and config.batch_size < 2:
        raise ConfigError(
            f"the unpaired stage needs batch_size >= 2 (got {config.batch_size}): the KL reference point pairs each "
            "prompt with another example's completion in the same batch, and with one example it would be that "
            "example's own log-ratio"
        )
    if config.precompute_ref:
        raise ConfigError("--precompute-ref is not supported by the unpaired stage yet: its KL pairs change with each batch")
    model, tokenizer = load_policy(context)

    def prepare(rows: Any, source: str) -> Any:
        formatted = format_unpaired(rows, tokenizer, source, config.num_proc)
        return tokenize_unpaired(formatted, tokenizer, config.max_length, config.overlong, source, config.num_proc)

    examples, eval_examples = prepare(context.rows, context.data_source), held_out_examples(context, prepare)
    labels = list(examples["label"])
    weights = (getattr(context.loss_params, "desirable_weight", None), getattr(context.loss_params, "undesirable_weight", None))
    if None not in weights:
        warning = imbalance_warning(labels, *weights, source=context.data_source)
        if warning:
            print(warning, file=sys.stderr)
    ref_model, adapter_reference, reference = reference_for(model, context)
    trainer = build_trainer(model, tokenizer, examples, config, context.loss, context.loss_params, context.output_dir,
                            stage_callbacks(context), ref_model, adapter_reference, eval_examples)
    desirable = sum(labels)
    announce(trainer, f"{len(examples)} examples ({desirable} desirable, {len(labels) - desirable} undesirable)", reference)
    return train_and_save(trainer, tokenizer, context)
