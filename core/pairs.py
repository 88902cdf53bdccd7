"""Preference pairs: what every stage that trains on chosen/rejected pairs shares.

Rows are standard (``prompt``, ``chosen``, ``rejected`` strings) or
conversational (message lists, rendered with the tokenizer's chat template),
the prompt extracted as the common prefix of chosen and rejected when the
data has no ``prompt`` column (:func:`split_prompt`). A batch of
pairs is one ``2B × T`` batch, chosen rows first, so chosen and rejected run
through the model in one forward; the loss sees a
:class:`molting.PreferenceInputs` and the stage logs trl's metric names
(:func:`preference_metrics`). The preference stage, the reward-model stage,
online DPO and the evaluation use these pieces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from molting.data import Rows
from molting.tokenization import tokenize_completions

if TYPE_CHECKING:  # pragma: no cover - typing only
    import datasets

SCHEMAS = (("prompt", "chosen", "rejected"), ("chosen", "rejected"))
"""The column sets a preference data set may have: with a prompt, or with the prompt implicit."""
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
"""trl's DPOTrainer metric names, which a preference stage logs."""


# --------------------------------------------------------------------------- data


def format_pairs(rows: Rows, tokenizer: Any, source: str, stage: str = "preference", carry: tuple[str, ...] = (),
                 num_proc: int | None = None) -> datasets.Dataset:
    """Validated rows as prompt/chosen/rejected strings (prompt extracted, chat template applied), ``carry``'s
    columns copied along.

    Each pair says whether the chat template wrote it (``templated``): its
    completions then end with the template's own end of turn and get no EOS
    (:func:`molting.tokenization.tokenize_completions`), as in trl.
    """
    from molting.data import check_columns, check_text_fields
    from molting.errors import DataError
    from molting.tokenization import map_rows

    schema = check_columns(rows, SCHEMAS, source, stage)
    adapt = _with_message_prompt if schema == SCHEMAS[0] else None
    conversational = check_text_fields(rows, schema, source, adapt=adapt)
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source} is conversational (message lists) but the model's tokenizer has no chat template")
    from molting.data import column_names

    tools = ("tools",) if conversational and "tools" in column_names(rows) else ()  # trl's `tools` column
    return map_rows(rows, _format_pair_batch, "formatting pairs", num_proc, columns=(*schema, *tools, *carry),
                    schema=schema, carry=carry, conversational=conversational, tokenizer=tokenizer, source=source)


def _format_pair_batch(batch: dict[str, list], indices: list[int], *, schema: tuple[str, ...], carry: tuple[str, ...],
                       conversational: bool, tokenizer: Any, source: str) -> dict[str, list]:
    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "templated": [], **{c: [] for c in carry}}
    for offset, values in enumerate(zip(*(batch[key] for key in schema))):
        row = dict(zip(schema, values))
        row = split_prompt(_with_message_prompt(row) if "prompt" in row else row)
        if conversational:
            tools = {"tools": batch["tools"][offset]} if "tools" in batch else {}
            row = render_chat({**row, **tools}, tokenizer, f"{source}, row {indices[offset]}")
        for key in ("prompt", "chosen", "rejected"):
            out[key].append(row[key])
        out["templated"].append(conversational)
        for name in carry:
            out[name].append(batch[name][offset])
    return out


def render_chat(row: dict[str, Any], tokenizer: Any, where: str) -> dict[str, Any]:
    """``row``'s message lists as the chat template's text (trl's ``maybe_apply_chat_template``); a template that
    refuses them (Gemma's refuses a system turn) is a :class:`~molting.errors.DataError` naming the row.

    A ``tools`` value (a list of JSON schemas, or that list as a JSON string) goes to the template's ``tools``,
    as trl passes a dataset's ``tools`` column: the rows then show the model the tools it may call."""
    from trl.data_utils import maybe_apply_chat_template

    from molting.errors import DataError

    row = dict(row)
    tools = tool_list(row.pop("tools", None), where)
    try:
        return maybe_apply_chat_template({key: _without_nones(value) for key, value in row.items()}, tokenizer,
                                         tools=tools)
    except Exception as exc:  # jinja2's TemplateError, raised by the template's raise_exception
        raise DataError(f"{where}: the model's chat template refuses it: {exc}") from exc


def tool_list(value: Any, where: str) -> list[dict[str, Any]] | None:
    """A row's ``tools``: JSON schemas as a list, or as that list written as a JSON string; ``None`` for none."""
    import json

    from molting.errors import DataError

    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}, field 'tools': expected a list of tool schemas (or it as JSON), got a string "
                            f"that is not JSON: {exc}") from exc
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise DataError(f"{where}, field 'tools': expected a list of tool schemas ({{type: function, function: "
                        f"{{name, description, parameters}}}}), got {type(value).__name__}")
    return [_without_none_fields(tool) for tool in value]


def _without_none_fields(value: Any) -> Any:
    """A schema without the ``None`` fields Arrow gives a struct that one row lacks and another has."""
    if isinstance(value, dict):
        return {k: _without_none_fields(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none_fields(v) for v in value]
    return value


def _without_nones(value: Any) -> Any:
    """A message list without the ``None`` values a dataset gives messages that lack a key other messages of the
    column have (Arrow stores one struct type per column): a chat template would see ``name: None`` as set."""
    if not isinstance(value, list):
        return value
    return [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in value]


HH_TURN = "\n\nAssistant:"
"""Where an answer starts in Anthropic hh-rlhf's text: the last such turn the two sides share ends the prompt."""


def split_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """A pair with an explicit prompt: ``row`` itself when it has one, else the common prefix of chosen and rejected.

    Message lists split at the first message that differs (trl's
    ``extract_prompt``). Text splits after the last ``"\n\nAssistant:"`` the
    two share when there is one (hh-rlhf's ``Human: … Assistant: …`` turns:
    a character-wise common prefix would cut answers that begin alike in the
    middle of their first word), else where the characters first differ.
    """
    from trl.data_utils import maybe_extract_prompt

    if "prompt" in row:
        return row
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        import os.path

        cut = os.path.commonprefix([chosen, rejected]).rfind(HH_TURN)
        if cut >= 0:
            cut += len(HH_TURN)
            return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}
    return maybe_extract_prompt(dict(row))


def _with_message_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """A row whose prompt is text and whose chosen/rejected are conversations, made all messages.

    When the conversations hold the prompt's turns themselves (as in
    HuggingFaceH4/ultrafeedback_binarized, where ``prompt`` is the user's text
    and ``chosen`` the whole exchange) the prompt is their shared turns;
    otherwise the text becomes one user message.
    """
    from molting.data import is_messages

    prompt, chosen = row["prompt"], row["chosen"]
    if not isinstance(prompt, str) or not is_messages(chosen) or not is_messages(row["rejected"]):
        return row
    if chosen[0].get("role") != "assistant":
        return split_prompt({"chosen": chosen, "rejected": row["rejected"]})
    return {**row, "prompt": [{"role": "user", "content": prompt}]}


def tokenize_pairs(
    pairs: Rows, tokenizer: Any, max_length: int, overlong: str, source: str = "data", carry: tuple[str, ...] = (),
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Token ids of each pair; pairs longer than ``max_length`` are truncated or dropped, and counted.

    Truncation keeps the end of the prompt (at least half of ``max_length``
    when the completions are long) and cuts the completions to fit.
    """
    return tokenize_completions(pairs, ("chosen", "rejected"), tokenizer, max_length, overlong, source, noun="pair",
                                carry=carry, num_proc=num_proc)


# --------------------------------------------------------------------------- batches


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
        return with_row_values(batch, examples)


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
        return with_row_values(batch, examples)


def with_row_values(batch: dict[str, Any], examples: list[dict[str, Any]]) -> dict[str, Any]:
    """``batch`` plus the per-pair values the examples carry: their index and precomputed reference log-probs."""
    import torch

    for key in ("index", "ref_chosen_logps", "ref_rejected_logps"):
        if key in examples[0]:
            batch[key] = torch.tensor([ex[key] for ex in examples])
    return batch


# --------------------------------------------------------------------------- log-probs and metrics


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


def preference_inputs(model: Any, batch: dict[str, Any], under_reference: Any = None) -> tuple[Any, Any]:
    """The policy's (and the reference's) log-probs of a batch of pairs, as a :class:`molting.PreferenceInputs`.

    ``batch`` is a :class:`PairCollator` or :class:`PackedPairCollator`
    batch; ``under_reference(model, compute)`` runs ``compute`` under the
    reference without gradients and returns ``None`` without one
    (:meth:`molting.training.MoltingTrainer.under_reference`). Precomputed
    reference log-probs in the batch (``ref_chosen_logps``) are used as they
    are. Returns the inputs and the policy's summed log-probs (chosen rows
    first), which :func:`preference_metrics` logs.
    """
    from molting.components import PreferenceInputs
    from molting.logps import completion_logps, packed_completion_logps

    if "segment_ids" in batch:  # packed, padding-free
        compute = lambda m: packed_completion_logps(m, batch)  # noqa: E731
        segments = batch["segment_ids"][0]
        lengths = batch["completion_mask"].new_zeros(int(segments.max()) + 1).index_add(
            0, segments, batch["completion_mask"][0]
        )
    else:
        ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        compute = lambda m: completion_logps(m, ids, attention, completion)  # noqa: E731
        lengths = completion.sum(dim=1)
    logps, token_logps, token_mask = compute(model)
    half = logps.size(0) // 2
    ref_chosen = ref_rejected = None
    if "ref_chosen_logps" in batch:
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    elif under_reference is not None:
        ref_logps = under_reference(model, lambda m: compute(m)[0])
        if ref_logps is not None:
            ref_chosen, ref_rejected = ref_logps[:half], ref_logps[half:]
    inputs = PreferenceInputs(
        chosen_logps=logps[:half], rejected_logps=logps[half:], ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected, chosen_lengths=lengths[:half], rejected_lengths=lengths[half:],
        chosen_token_logps=token_logps[:half], chosen_mask=token_mask[:half],
    )
    return inputs, logps


def pair_logps(model: Any, examples: Rows, collator: Any,
               batch_size: int = 32) -> tuple[Any, Any]:
    """Summed completion log-probs of the chosen and the rejected side of tokenized pairs, in eval mode, without
    gradients (reference passes, ``--precompute-ref``, evaluation)."""
    import torch

    from molting.data import batches
    from molting.logps import completion_logps

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    with torch.no_grad():
        for chunk in batches(examples, batch_size, ("prompt_ids", "chosen_ids", "rejected_ids")):
            batch = {k: v.to(device) for k, v in collator(chunk).items()}
            logps, _, _ = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            chosen.append(logps[: len(chunk)].float().cpu())
            rejected.append(logps[len(chunk) :].float().cpu())
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)
