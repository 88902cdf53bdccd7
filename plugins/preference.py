"""The ``preference`` stage: paired prompt/chosen/rejected data, a policy and a frozen reference.

Data is standard (strings) or conversational (message lists, rendered with
the tokenizer's chat template); a missing prompt is extracted as the common
prefix of chosen and rejected. Each step runs chosen and rejected through
the policy in one concatenated forward, the reference likewise without
gradients, and hands the summed completion log-probs to the loss plugin.
"""

from __future__ import annotations

import sys
from typing import Any

import molting
from molting.components import Stage

SCHEMAS = (("prompt", "chosen", "rejected"), ("chosen", "rejected"))
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


@molting.hookimpl
def molting_register_stages(register):
    register(
        Stage(
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


# --------------------------------------------------------------------------- data


def format_pairs(rows: list[dict[str, Any]], tokenizer: Any, source: str) -> list[dict[str, str]]:
    """Validated rows as prompt/chosen/rejected strings (prompt extracted, chat template applied)."""
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    from molting.data import check_columns, check_text_fields
    from molting.errors import DataError

    schema = check_columns(rows, SCHEMAS, source, "preference")
    conversational = check_text_fields(rows, schema, source)
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source} is conversational (message lists) but the model's tokenizer has no chat template")
    formatted = []
    for row in rows:
        row = maybe_extract_prompt({k: row[k] for k in schema})
        if conversational:
            row = maybe_apply_chat_template(row, tokenizer)
        formatted.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]})
    return formatted


def tokenize_pairs(
    pairs: list[dict[str, str]], tokenizer: Any, max_length: int, overlong: str, source: str = "data"
) -> list[dict[str, list[int]]]:
    """Token ids of each pair; pairs longer than ``max_length`` are truncated or dropped, and counted.

    Truncation keeps the end of the prompt (at least half of ``max_length``
    when the completions are long) and cuts the completions to fit.
    """
    return tokenize_completions(pairs, ("chosen", "rejected"), tokenizer, max_length, overlong, source, noun="pair")


def _without_eos(text: str, tokenizer: Any) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    return text.removesuffix(eos) if eos and isinstance(text, str) else text


def tokenize_completions(
    rows: list[dict[str, Any]],
    keys: tuple[str, ...],
    tokenizer: Any,
    max_length: int,
    overlong: str,
    source: str = "data",
    noun: str = "pair",
    carry: tuple[str, ...] = (),
    add_eos: bool = True,
) -> list[dict[str, Any]]:
    """Token ids of each row's ``prompt`` and of its completions ``keys`` (``KEY_ids``, EOS appended unless not ``add_eos``).

    Shared by the preference stage (``keys`` chosen, rejected) and the
    unpaired one (``keys`` completion). A row whose prompt plus longest
    completion exceeds ``max_length`` is truncated (the end of the prompt is
    kept, at least half of ``max_length`` when the completions are long, and
    the completions are cut to fit) or, with ``overlong="drop"``, dropped;
    either way they are counted and reported, in ``noun``s. ``carry`` names
    fields copied unchanged into each example (e.g. ``label``).
    """
    from molting.data import with_bos
    from molting.errors import DataError

    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    examples, too_long, prompt_too_long = [], 0, 0
    for index, row in enumerate(rows):
        prompt = tokenizer(with_bos(row["prompt"], tokenizer), add_special_tokens=False)["input_ids"] or [start]
        # EOS once: a completion that already ends with the EOS text does not get a second (trl's add_eos)
        completions = [tokenizer(_without_eos(row[key], tokenizer), add_special_tokens=False)["input_ids"] + eos
                       for key in keys]
        longest = max(len(c) for c in completions)
        if len(prompt) + longest > max_length:
            too_long += 1
            prompt_too_long += len(prompt) >= max_length
            if overlong == "drop":
                continue
            keep = max(max_length - longest, max_length // 2, 1)
            prompt = prompt[len(prompt) - keep :] if len(prompt) > keep else prompt
            completions = [c[: max_length - len(prompt)] for c in completions]
            if not all(completions):  # no room left for a completion token: nothing to learn from this row
                continue
        example = {"index": index, "length": len(prompt) + max(len(c) for c in completions), "prompt_ids": prompt,
                   **{f"{key}_ids": c for key, c in zip(keys, completions)}}
        examples.append({**example, **{name: row[name] for name in carry}})
    if too_long:
        action = "dropped" if overlong == "drop" else "truncated (prompt kept from its end, completions cut)"
        print(
            f"molting: {too_long} of {len(rows)} {noun}s in {source} are longer than max_length={max_length} "
            f"({prompt_too_long} with the prompt alone that long): {action}. "
            f"Use --max-length or --overlong {'truncate' if overlong == 'drop' else 'drop'} to change this.",
            file=sys.stderr,
        )
    if not examples:
        raise DataError(f"no {noun} of {source} fits in max_length={max_length}; raise --max-length")
    return examples


class PackedPairCollator:
    """Packs a list of tokenized pairs into ONE row without padding: chosen sequences first, then rejected.

    See :mod:`molting.packing`: positions restart at each sequence and
    ``cu_seq_lens`` marks where each one ends, so attention stays inside it.
    """

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        from molting.packing import pack

        sides = ("chosen_ids", "rejected_ids")
        batch = pack([ex["prompt_ids"] + ex[side] for side in sides for ex in examples],
                     [len(ex["prompt_ids"]) for _ in sides for ex in examples])
        return _with_row_values(batch, examples)


class PairCollator:
    """Pads a list of tokenized pairs into one batch: chosen rows first, then rejected rows."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        sequences, prompt_lengths = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                sequences.append(ex["prompt_ids"] + ex[key])
                prompt_lengths.append(len(ex["prompt_ids"]))
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, (seq, plen) in enumerate(zip(sequences, prompt_lengths)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention_mask[row, : len(seq)] = 1
            completion_mask[row, plen : len(seq)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
        return _with_row_values(batch, examples)


def _with_row_values(batch: dict[str, Any], examples: list[dict[str, Any]]) -> dict[str, Any]:
    """``batch`` plus the per-pair values the examples carry: their index and precomputed reference log-probs."""
    import torch

    for key in ("index", "ref_chosen_logps", "ref_rejected_logps"):
        if key in examples[0]:
            batch[key] = torch.tensor([ex[key] for ex in examples])
    return batch


# --------------------------------------------------------------------------- training


def preference_trainer_class():
    """The Trainer subclass, built on first use so this module imports without torch."""
    from molting.components import PreferenceInputs
    from molting.packing import packed_completion_logps
    from molting.training import MoltingTrainer, completion_logps

    class PreferenceTrainer(MoltingTrainer):
        """Runs the policy (and the reference, unless precomputed) on chosen+rejected and applies the loss plugin."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "segment_ids" in inputs:  # packed, padding-free
                compute = lambda m: packed_completion_logps(m, inputs)  # noqa: E731
                segments = inputs["segment_ids"][0]
                lengths = inputs["completion_mask"].new_zeros(int(segments.max()) + 1).index_add(
                    0, segments, inputs["completion_mask"][0]
                )
            else:
                ids, attention, completion = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
                compute = lambda m: completion_logps(m, ids, attention, completion)  # noqa: E731
                lengths = completion.sum(dim=1)
            logps, token_logps, token_mask = compute(model)
            half = logps.size(0) // 2
            ref_chosen = ref_rejected = None
            if "ref_chosen_logps" in inputs:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            elif self.has_reference:
                ref_logps = self.under_reference(model, lambda m: compute(m)[0])
                ref_chosen, ref_rejected = ref_logps[:half], ref_logps[half:]
            out = self.loss_plugin.compute(
                PreferenceInputs(
                    chosen_logps=logps[:half],
                    rejected_logps=logps[half:],
                    ref_chosen_logps=ref_chosen,
                    ref_rejected_logps=ref_rejected,
                    chosen_lengths=lengths[:half],
                    rejected_lengths=lengths[half:],
                    chosen_token_logps=token_logps[:half],
                    chosen_mask=token_mask[:half],
                ),
                self.loss_params,
            )
            loss = out.losses.mean()
            self.record(preference_metrics(out, logps[:half], logps[half:]))
            return (loss, {"losses": out.losses}) if return_outputs else loss

    return PreferenceTrainer


def preference_metrics(out: Any, chosen_logps: Any, rejected_logps: Any) -> dict[str, Any]:
    """trl's metric names, from a loss's rewards and the policy's log-probs."""
    metrics: dict[str, Any] = {"logps/chosen": chosen_logps.detach(), "logps/rejected": rejected_logps.detach()}
    if out.chosen_rewards is not None and out.rejected_rewards is not None:
        chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
        metrics.update(
            {
                "rewards/chosen": chosen,
                "rewards/rejected": rejected,
                "rewards/margins": chosen - rejected,
                "rewards/accuracies": (chosen > rejected).float(),
            }
        )
    metrics.update({name: value.detach() if hasattr(value, "detach") else value for name, value in out.metrics.items()})
    return metrics


def build_trainer(model, tokenizer, examples, config, loss, loss_params, output_dir, callbacks=(), ref_model=None,
                  adapter_reference=False):
    """The preference Trainer for tokenized ``examples`` (see :func:`tokenize_pairs`)."""
    from molting import training

    collator = PackedPairCollator() if config.padding_free else PairCollator(tokenizer.pad_token_id)
    return training.build_trainer(preference_trainer_class(), collator, model, tokenizer, examples, config, loss,
                                  loss_params, output_dir, callbacks, ref_model, adapter_reference)


def run_preference(context) -> dict[str, Any]:
    from molting.training import announce, load_policy, reference_for, stage_callbacks, train_and_save

    config = context.config
    model, tokenizer = load_policy(context)
    if config.padding_free:
        from molting.packing import use_varlen_attention

        use_varlen_attention(model)
    pairs = format_pairs(context.rows, tokenizer, context.data_source)
    examples = tokenize_pairs(pairs, tokenizer, config.max_length, config.overlong, context.data_source)
    ref_model, adapter_reference, reference = reference_for(model, context)
    if config.precompute_ref and (ref_model is not None or adapter_reference):
        from molting.refcache import precomputed_reference

        examples = precomputed_reference(ref_model if ref_model is not None else model, adapter_reference, examples,
                                         tokenizer, context, PairCollator(tokenizer.pad_token_id))
        ref_model, adapter_reference, reference = None, False, "precomputed (none held while training)"
    trainer = build_trainer(model, tokenizer, examples, config, context.loss, context.loss_params, context.output_dir,
                            stage_callbacks(context), ref_model, adapter_reference)
    announce(trainer, f"{len(examples)} pairs", reference)
    return train_and_save(trainer, tokenizer, context)
