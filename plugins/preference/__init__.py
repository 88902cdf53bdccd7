"""The ``preference`` stage: paired prompt/chosen/rejected data, a policy and a frozen reference.

Data is standard (strings) or conversational (message lists, rendered with
the tokenizer's chat template); a missing prompt is extracted as the common
prefix of chosen and rejected (:mod:`molting.pairs`). Each step runs chosen
and rejected through the policy in one concatenated forward, the reference
likewise without gradients (or reads its precomputed log-probs), and hands
the summed completion log-probs to the loss plugin (:mod:`.trainer`).
"""

from __future__ import annotations

from typing import Any

import molting
from molting.context import StageContext
from molting.pairs import METRICS, SCHEMAS


@molting.hookimpl
def molting_register_stages(register):
    register(
        molting.Stage(
            name="preference",
            run=run_preference,
            description="Offline preference optimisation on prompt/chosen/rejected pairs (DPO and its family).",
            columns=SCHEMAS[0],
            default_loss="dpo",
            default_data="demo-preference",
            metrics=METRICS,
            inputs=molting.PreferenceInputs,
        )
    )


def build_trainer(model, tokenizer, examples, config, loss, loss_params, output_dir, callbacks=(), ref_model=None,
                  adapter_reference=False, eval_examples=None):
    """The preference Trainer for tokenized ``examples`` (see :func:`molting.pairs.tokenize_pairs`)."""
    from molting import training
    from molting.pairs import PackedPairCollator, PairCollator

    from .trainer import PreferenceTrainer

    collator = PackedPairCollator() if config.padding_free else PairCollator(tokenizer.pad_token_id)
    return training.build_trainer(PreferenceTrainer, collator, model, tokenizer, examples, config, loss,
                                  loss_params, output_dir, callbacks, ref_model, adapter_reference, eval_examples)


def run_preference(context: StageContext) -> dict[str, Any]:
    from molting.pairs import PairCollator, format_pairs, tokenize_pairs
    from molting.training import announce, held_out_examples, load_policy, reference_for, stage_callbacks, train_and_save

    config = context.config
    model, tokenizer = load_policy(context)
    if config.padding_free:
        from molting.packing import use_varlen_attention

        use_varlen_attention(model)

    def prepare(rows: Any, source: str) -> Any:
        pairs = format_pairs(rows, tokenizer, source, num_proc=config.num_proc)
        return tokenize_pairs(pairs, tokenizer, config.max_length, config.overlong, source, num_proc=config.num_proc)

    examples, eval_examples = prepare(context.rows, context.data_source), held_out_examples(context, prepare)
    if config.precompute_ref and context.loss.needs_reference:
        from molting.refcache import precomputed_reference

        # the policy has not trained yet: it is the reference (its base, with LoRA), so no copy is ever made
        examples, eval_examples = (
            None if part is None else precomputed_reference(model, bool(config.lora_r), part, tokenizer, context,
                                                            PairCollator(tokenizer.pad_token_id))
            for part in (examples, eval_examples))
        ref_model, adapter_reference, reference = None, False, "precomputed (none held while training)"
    else:
        ref_model, adapter_reference, reference = reference_for(model, context)
    trainer = build_trainer(model, tokenizer, examples, config, context.loss, context.loss_params, context.output_dir,
                            stage_callbacks(context), ref_model, adapter_reference, eval_examples)
    announce(trainer, f"{len(examples)} pairs", reference)
    return train_and_save(trainer, tokenizer, context)
