"""The ``sft`` stage: supervised fine-tuning on prompts and their completions, the loss on the completion only.

Each row is a prompt and the completion to learn:

- standard: ``prompt`` and ``completion`` strings (an EOS token is appended
  to the completion unless it already ends with one);
- conversational: ``prompt`` and ``completion`` message lists, or one
  ``messages`` list whose last message (the assistant's) is the completion
  and the messages before it the prompt. The tokenizer's chat template is
  applied as trl applies it; the completion keeps the template's own end of
  turn and gets no extra EOS, as in trl. A ``tools`` column (JSON schemas,
  as trl reads it) goes to the template, so tool-use demonstrations (an
  assistant turn with ``tool_calls``, ``tool`` results in the prompt) train
  with the tools listed as the model will see them.

The loss is trl's ``SFTTrainer`` with ``completion_only_loss``: the negative
log-likelihood of the completion tokens, summed over every completion token
of the optimizer step (all gradient-accumulation micro-batches and all
processes, the count the Trainer passes as ``num_items_in_batch``) and
divided by their number — the mean over completion tokens. The output layer
runs only on the positions that can predict a completion token. Logged, under
trl's names: ``loss``, ``mean_token_accuracy`` (the share of completion tokens
that are the model's top-1 prediction), ``entropy`` (mean entropy of the
predicted distribution over completion tokens) and ``num_tokens`` (tokens
seen so far, prompts and completions). No reference model, no loss plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import molting
from molting.components import Stage
from molting.context import StageContext
from molting.data import Rows

if TYPE_CHECKING:  # pragma: no cover - typing only
    import datasets

SCHEMAS = (("prompt", "completion"), ("messages",))
METRICS = ("loss", "mean_token_accuracy", "entropy", "num_tokens")


@molting.hookimpl
def molting_register_stages(register):
    register(
        Stage(
            name="sft",
            run=run_sft,
            description="Supervised fine-tuning on prompt/completion rows: mean NLL of the completion tokens.",
            columns=SCHEMAS[0],
            default_loss=None,
            default_data="demo-sft",
            metrics=METRICS,
            produces="policy",
            demo_defaults={"epochs": 1.0},  # the demo model is fine-tuned already: one more pass is enough
        )
    )


# --------------------------------------------------------------------------- data


def check_sft_rows(rows: list[dict[str, Any]], source: str) -> tuple[tuple[str, ...], bool]:
    """The schema of the rows and whether they are conversational; a :class:`DataError` naming row and field otherwise.

    Needs no tokenizer, so bad data is reported before any model loads.
    """
    from molting.data import check_columns, check_text_fields, iter_rows

    schema = check_columns(rows, SCHEMAS, source, "sft")
    if schema == ("messages",):
        for index, row in enumerate(iter_rows(rows, schema)):
            _check_conversation(row["messages"], source, index)
        return schema, True
    return schema, check_text_fields(rows, schema, source)


def _check_conversation(messages: Any, source: str, index: int) -> None:
    from molting.data import is_messages
    from molting.errors import DataError

    where = f"{source}, row {index}, field 'messages'"
    if not is_messages(messages):
        shown = repr(messages)
        shown = shown if len(shown) < 80 else shown[:77] + "..."
        raise DataError(f"{where}: expected a list of {{role, content}} messages; got {shown}")
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise DataError(
            f"{where}: expected at least one message followed by the assistant's answer (the completion to learn); "
            f"got the roles {roles}"
        )


def format_sft(rows: Rows, tokenizer: Any, source: str, checked: tuple[tuple[str, ...], bool] | None = None,
               num_proc: int | None = None) -> tuple[datasets.Dataset, bool]:
    """Validated rows as prompt/completion strings (chat template applied), and whether they were conversational.

    ``checked`` is what :func:`check_sft_rows` returned for these rows, if it ran already.
    """
    from molting.errors import DataError
    from molting.tokenization import map_rows

    schema, conversational = checked or check_sft_rows(rows, source)
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source} is conversational (message lists) but the model's tokenizer has no chat template")
    from molting.data import column_names

    tools = ("tools",) if conversational and "tools" in column_names(rows) else ()
    formatted = map_rows(rows, _format_sft_batch, "formatting examples", num_proc, columns=schema + tools,
                         schema=schema, conversational=conversational, tokenizer=tokenizer, source=source)
    return formatted, conversational


def _format_sft_batch(batch: dict[str, list], indices: list[int], *, schema: tuple[str, ...], conversational: bool,
                      tokenizer: Any, source: str) -> dict[str, list]:
    from molting.pairs import render_chat

    out: dict[str, list] = {"prompt": [], "completion": [], "templated": []}
    for offset, index in enumerate(indices):
        if schema == ("messages",):
            messages = batch["messages"][offset]
            text = {"prompt": messages[:-1], "completion": messages[-1:]}
        else:
            text = {"prompt": batch["prompt"][offset], "completion": batch["completion"][offset]}
        if "tools" in batch:  # the tools the rows show the model (trl's `tools` column)
            text["tools"] = batch["tools"][offset]
        if conversational:
            text = render_chat(text, tokenizer, f"{source}, row {index}")
        out["prompt"].append(text["prompt"])
        out["completion"].append(text["completion"])
        out["templated"].append(conversational)
    return out


def tokenize_sft(
    examples: Rows, tokenizer: Any, max_length: int, overlong: str, source: str = "data",
    conversational: bool = False, num_proc: int | None = None,
) -> datasets.Dataset:
    """Token ids (``prompt_ids``, ``completion_ids``) of each example, as the preference stage tokenizes.

    Overlong examples are truncated or dropped and counted by
    ``tokenize_completions``; an example with no completion token left is
    dropped. As in trl, a standard completion gets EOS once (none added
    when it already ends with the EOS text), and a conversational
    completion none at all: its chat template ends the turn.
    """
    from molting.tokenization import tokenize_completions

    return tokenize_completions(examples, ("completion",), tokenizer, max_length, overlong, source, noun="example",
                                add_eos=not conversational, num_proc=num_proc)


class SFTCollator:
    """Pads tokenized examples into trl's language-modeling batch: ``input_ids``, ``attention_mask`` and
    ``labels`` (the completion tokens; -100 on the prompt and on padding), plus ``index``.

    The batch is what trl's ``DataCollatorForLanguageModeling`` builds for an
    SFT dataset with ``completion_only_loss``; the labels also let the Trainer
    count the completion tokens of each optimizer step (``num_items_in_batch``).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        sequences = [
            {"input_ids": ex["prompt_ids"] + ex["completion_ids"],
             "labels": [-100] * len(ex["prompt_ids"]) + ex["completion_ids"]}
            for ex in examples
        ]
        batch = DataCollatorForLanguageModeling(pad_token_id=self.pad_token_id)(sequences)
        if "index" in examples[0]:
            batch["index"] = torch.tensor([ex["index"] for ex in examples])
        return batch


# --------------------------------------------------------------------------- training


def build_trainer(model, tokenizer, examples, config, output_dir, callbacks=(), eval_examples=None):
    """The SFT Trainer for tokenized ``examples`` (see :func:`tokenize_sft`)."""
    from molting import training

    from .trainer import SFTTrainer

    return training.build_trainer(SFTTrainer, SFTCollator(tokenizer.pad_token_id), model, tokenizer, examples,
                                  config, None, None, output_dir, callbacks, eval_examples=eval_examples)


def run_sft(context: StageContext) -> dict[str, Any]:
    from molting.errors import ConfigError
    from molting.tokenization import token_count
    from molting.training import announce, held_out_examples, load_policy, stage_callbacks, train_and_save

    config = context.config
    if config.padding_free:
        raise ConfigError("--padding-free is not supported by the sft stage yet: drop it (batches are padded)")
    checked = check_sft_rows(context.rows, context.data_source)  # bad rows fail before the model loads
    held_out = check_sft_rows(context.eval_rows, str(context.eval_data)) if context.eval_rows is not None else None
    model, tokenizer = load_policy(context, keep_dropout=True)

    def prepare(rows: Any, source: str) -> Any:
        formatted, conversational = format_sft(rows, tokenizer, source, checked if rows is context.rows else held_out,
                                               config.num_proc)
        return tokenize_sft(formatted, tokenizer, config.max_length, config.overlong, source, conversational,
                            config.num_proc)

    examples, eval_examples = prepare(context.rows, context.data_source), held_out_examples(context, prepare)
    trainer = build_trainer(model, tokenizer, examples, config, context.output_dir, stage_callbacks(context),
                            eval_examples)
    tokens = token_count(examples, "completion_ids")
    announce(trainer, f"{len(examples)} examples ({tokens} completion tokens)", "none (SFT needs none)")
    return train_and_save(trainer, tokenizer, context)
