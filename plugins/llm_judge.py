"""The ``llm-pairwise`` judge: a local causal LM says which of two answers is better.

For each pair of completions the judge fills ``template`` with the
question and the two answers, labelled A and B, and compares the model's
log-probabilities of the two labels (``label_a``, ``label_b``) as the next
tokens: the more likely label wins. Reading the label's probability, rather
than generating an answer and parsing it, always yields a verdict and is
deterministic. Every pair is judged in both orders, (A, B) and then (B, A),
to cancel the model's preference for a position: the verdict is 0 (the
first completion) or 1 (the second) when both orders agree, and -1
(undecided) when they do not.

The model is any causal LM, a directory or hub id (``model``, required),
loaded once per directory and process. With ``chat`` (the default) the
filled template is sent as a user message through the tokenizer's chat
template, when it has one. ``template`` must contain ``{question}``, ``{answer_a}`` and
``{answer_b}``; other braces are left as they are. A judging prompt longer
than ``max_length`` tokens keeps its end (the answers and the request).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import attrs

import molting
from molting.components import Judge
from molting.errors import ConfigError
from molting.judging import number_setting, text_of

NAME = "llm-pairwise"
PLACEHOLDERS = ("{question}", "{answer_a}", "{answer_b}")
TEMPLATE = (
    "Here is a question and two answers to it, A and B. Which answer is better: more correct, more helpful and "
    "clearer?\n\nQuestion: {question}\n\nAnswer A: {answer_a}\n\nAnswer B: {answer_b}\n\n"
    "Reply with the letter of the better answer, A or B. The better answer is"
)
_MODELS: dict[str, tuple[Any, Any]] = {}  # resolved directory → (model, tokenizer)


def _check_template(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    missing = [p for p in PLACEHOLDERS if not isinstance(value, str) or p not in value]
    if missing:
        raise ValueError(f"judge {NAME!r}: setting template lacks {', '.join(missing)}; it must contain all of "
                         f"{', '.join(PLACEHOLDERS)}")


def _check_text(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"judge {NAME!r}: setting {attribute.name} must be a non-empty string, got {value!r}")


def _check_model(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        _check_text(instance, attribute, value)


@attrs.frozen
class LLMJudgeParams:
    """Settings of the ``llm-pairwise`` judge (``judge_args: {llm-pairwise: {...}}``)."""

    model: str | None = attrs.field(default=None, validator=_check_model)
    """The judging model: a causal LM's directory or hub id (``ORG/NAME[@REV]``); required."""
    template: str = attrs.field(default=TEMPLATE, validator=_check_template)
    """The judging prompt, with {question}, {answer_a} and {answer_b}."""
    label_a: str = attrs.field(default=" A", validator=_check_text)
    """The text that names answer A right after the prompt (mind the leading space)."""
    label_b: str = attrs.field(default=" B", validator=_check_text)
    """The text that names answer B."""
    chat: bool = True
    """Send the prompt through the tokenizer's chat template, as a user message, when it has one."""
    max_length: int = attrs.field(default=2048, validator=number_setting(NAME, 1, integer=True))
    """Longest judging prompt in tokens; a longer one keeps its end."""
    batch_size: int = attrs.field(default=8, validator=number_setting(NAME, 0, strict=True, integer=True))
    """Judging prompts per forward pass."""


def load_judge_model(model: str | None) -> tuple[Any, Any]:
    """The judging model and tokenizer in directory ``model``, loaded once per process, in evaluation mode."""
    import torch

    from molting.models import load_causal_lm, resolve_model_path

    if model is None:
        raise ConfigError(
            f"judge {NAME!r} needs the judging model: judge_args: {{{NAME}: {{model: DIR}}}} (a causal LM's "
            "directory or hub id, e.g. an instruction-tuned model)"
        )
    key = str(resolve_model_path(model, what=f"judge {NAME!r}: model"))
    if key not in _MODELS:
        cuda = torch.cuda.is_available()
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
        network, tokenizer = load_causal_lm(key, dtype=dtype)
        network.requires_grad_(False).eval()
        if cuda:
            network.to(torch.device("cuda", torch.cuda.current_device()))
        _MODELS[key] = (network, tokenizer)
    return _MODELS[key]


def judging_prompt(question: Any, answer_a: Any, answer_b: Any, params: LLMJudgeParams, tokenizer: Any) -> list[int]:
    """Token ids of the filled template (through the chat template when asked and available), at most ``max_length``."""
    text = params.template
    for placeholder, value in zip(PLACEHOLDERS, (question, answer_a, answer_b)):
        text = text.replace(placeholder, text_of(value).strip())
    if params.chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds its own special tokens
    else:
        ids = tokenizer(text)["input_ids"]
    return ids[-params.max_length:]


def _labels(params: LLMJudgeParams, tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """The labels' common leading tokens and each label's remaining ones (which must differ and be non-empty)."""
    a = tokenizer(params.label_a, add_special_tokens=False)["input_ids"]
    b = tokenizer(params.label_b, add_special_tokens=False)["input_ids"]
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    if common == len(a) or common == len(b):
        raise ConfigError(
            f"judge {NAME!r}: labels {params.label_a!r} and {params.label_b!r} tokenize to {a} and {b}; one is a prefix "
            "of the other, so their probabilities cannot be compared; choose labels that differ"
        )
    return a[:common], a[common:], b[common:]


def continuation_logps(network: Any, pad: int, contexts: list[list[int]], continuations: Sequence[list[int]],
                       batch_size: int) -> list[list[float]]:
    """``log p(continuation | context)`` summed over its tokens, for every context and continuation.

    When every continuation is one token this is one forward pass per batch
    (the next-token distribution after each context); otherwise one per
    continuation. Contexts are left-padded, so the positions that predict
    the continuation line up at the end and only those reach the output layer.
    """
    import torch

    device = next(network.parameters()).device
    single = all(len(c) == 1 for c in continuations)
    passes = [[]] if single else [list(c) for c in continuations]
    results: list[list[float]] = [[0.0] * len(continuations) for _ in contexts]
    with torch.inference_mode():
        for start in range(0, len(contexts), batch_size):
            chunk = contexts[start : start + batch_size]
            for number, extra in enumerate(passes):
                seqs = [ctx + extra for ctx in chunk]
                width = max(len(s) for s in seqs)
                input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
                mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
                positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
                keep = len(extra) + 1
                logits = network(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False,
                                 logits_to_keep=keep).logits[:, -keep:].float()
                logps = torch.log_softmax(logits, dim=-1)
                for row in range(len(chunk)):
                    if single:
                        for k, continuation in enumerate(continuations):
                            results[start + row][k] = float(logps[row, -1, continuation[0]])
                    else:
                        targets = torch.tensor(extra, device=device)
                        picked = logps[row, :-1].gather(1, targets[:, None]).sum()
                        results[start + row][number] = float(picked)
    return results


def pairwise_verdicts(prompts: list[Any], completions: list[Sequence[Any]], params: LLMJudgeParams) -> list[int]:
    """0 or 1 (the better completion of each pair) when both orders agree, else -1."""
    from molting.sampling import pad_token_id

    network, tokenizer = load_judge_model(params.model)
    common, rest_a, rest_b = _labels(params, tokenizer)
    contexts = []
    for index, (prompt, pair) in enumerate(zip(prompts, completions)):
        if isinstance(pair, (str, bytes)) or len(pair) != 2:
            raise ValueError(f"judge {NAME!r} compares pairs of completions; item {index} is {pair!r}")
        first, second = pair
        for answer_a, answer_b in ((first, second), (second, first)):
            ids = judging_prompt(prompt, answer_a, answer_b, params, tokenizer)
            contexts.append(ids + common)
    pad = pad_token_id(tokenizer)
    logps = continuation_logps(network, pad, contexts, [rest_a, rest_b], params.batch_size)
    verdicts = []
    for index in range(len(prompts)):
        (a1, b1), (a2, b2) = logps[2 * index], logps[2 * index + 1]
        in_order = 0 if a1 > b1 else 1 if b1 > a1 else None  # A is the first completion
        swapped = 1 if a2 > b2 else 0 if b2 > a2 else None  # A is the second completion
        verdicts.append(in_order if in_order is not None and in_order == swapped else -1)
    return verdicts


def example_settings(workdir: Path) -> dict[str, Any]:
    """Settings that let the conformance checks score with this judge: the built-in demo model as the judge."""
    from molting.demo import demo_model_dir

    return {"model": str(demo_model_dir())}


@molting.hookimpl
def molting_register_judges(register):
    register(
        Judge(
            name=NAME,
            score=pairwise_verdicts,
            description="A local LM picks the better of two answers by the log-probs of 'A' and 'B', in both orders.",
            kind="pairwise",
            params=LLMJudgeParams,
            example=example_settings,
        )
    )
