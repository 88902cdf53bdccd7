"""The ``reward-model`` judge: a trained reward model's score of prompt + completion.

The model is a sequence classifier with one output (a directory that
``AutoModelForSequenceClassification`` loads, ``num_labels=1``, safetensors
weights, its tokenizer beside it), such as the ``reward-model`` stage
writes; the score is ``logits[:, 0]``. In a pipeline
(``--plugin reward-model --plugin ppo``) ``model`` defaults to the reward
model the run just trained; otherwise give it with
``judge_args: {reward-model: {model: DIR}}``.

Each text is tokenized as the reward-model stage tokenizes a training pair:
the prompt (a message list through the tokenizer's chat template; a
conversational prompt and completion together, as trl's
``maybe_apply_chat_template`` formats them), then the completion and the
end-of-sequence token, without other special tokens;
a text longer than ``max_length`` tokens keeps the end of its prompt and
the start of its completion. Batches are right-padded; the model reads the
last token that is not padding. A model is loaded once per directory and
process, in evaluation mode, on the GPU when there is one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

import molting
from molting.components import Judge
from molting.errors import ConfigError, ModelError
from molting.data import with_bos
from molting.judging import ARTIFACT, number_setting, text_of

NAME = "reward-model"
_MODELS: dict[str, tuple[Any, Any]] = {}  # resolved directory → (model, tokenizer)


def _check_model(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"judge {NAME!r}: setting model must be a directory or hub id (a string), got {value!r}")


@attrs.frozen
class RewardJudgeParams:
    """Settings of the ``reward-model`` judge (``judge_args: {reward-model: {...}}``)."""

    model: str | None = attrs.field(default=None, validator=_check_model, metadata={ARTIFACT: "reward-model"})
    """The reward model's directory or hub id (``ORG/NAME[@REV]``); in a pipeline, the one an earlier step trained."""
    batch_size: int = attrs.field(default=16, validator=number_setting(NAME, 0, strict=True, integer=True))
    """Texts scored per forward pass."""
    max_length: int = attrs.field(default=1024, validator=number_setting(NAME, 1, integer=True))
    """Longest text in tokens (prompt + completion + EOS); longer ones are cut (see the module docstring)."""


def load_reward_model(model: str | None) -> tuple[Any, Any]:
    """The reward model and tokenizer in directory (or hub id) ``model``, loaded once per process."""
    if model is None:
        raise ConfigError(
            f"judge {NAME!r} needs a reward model: give its directory with judge_args: {{{NAME}: {{model: DIR}}}} "
            "(in a recipe, or --set judge_args=...), or train one earlier in the run (--plugin reward-model before "
            "this stage)"
        )
    from molting.models import resolve_model_path

    path = resolve_model_path(model, what=f"judge {NAME!r}: model")
    key = str(path)
    if key not in _MODELS:
        _MODELS[key] = _load(path, model)
    return _MODELS[key]


def _load(path: Path, given: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from molting.models import load_tokenizer

    where = f"judge {NAME!r}: model {given!r}"
    if not (path / "config.json").is_file():
        raise ModelError(f"{where} is not a model directory ({path / 'config.json'} is missing)")
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "num_labels", None) != 1:
        architectures = ", ".join(config.architectures or []) or "unknown"
        raise ModelError(
            f"{where} is not a reward model: it has {config.num_labels} outputs (architectures: {architectures}); "
            "expected a sequence classifier with num_labels=1, as the reward-model stage trains"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"{where} has no .safetensors weights; molting loads weights as safetensors only")
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    try:
        network = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True, dtype=dtype)
    except Exception as exc:
        raise ModelError(f"{where} cannot be loaded as a sequence classifier: {exc}") from exc
    tokenizer = load_tokenizer(path)
    if network.config.pad_token_id is None:
        network.config.pad_token_id = tokenizer.pad_token_id
    network.requires_grad_(False).eval()
    if cuda:
        network.to(torch.device("cuda", torch.cuda.current_device()))
    return network, tokenizer


def encode(prompt: Any, completion: Any, tokenizer: Any, max_length: int) -> list[int]:
    """Token ids of one prompt + completion + EOS, at most ``max_length`` of them (see the module docstring)."""
    from molting.sampling import prompt_texts
    from molting.tokenization import truncate, without_eos

    if not isinstance(prompt, str) and not isinstance(completion, str):  # both message lists: as the stage formats pairs
        from trl.data_utils import maybe_apply_chat_template

        texts = maybe_apply_chat_template({"prompt": list(prompt), "completion": list(completion)}, tokenizer)
        prompt_text, completion_text = texts["prompt"], texts["completion"]
        eos = []  # the template ends the turn its own way, as the reward stage trains on conversations
    else:
        prompt_text, completion_text = prompt_texts([prompt], tokenizer)[0], text_of(completion)
        completion_text = without_eos(completion_text, tokenizer)  # one EOS, as the reward stage trains
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt_ids = tokenizer(with_bos(prompt_text, tokenizer), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"] + eos
    if len(prompt_ids) + len(completion_ids) > max_length:  # as the reward-model stage truncates its pairs
        prompt_ids, (completion_ids,) = truncate(prompt_ids, [completion_ids], max_length)
    ids = prompt_ids + completion_ids
    if not ids:  # an empty prompt and completion, and no EOS: score one start token
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
        ids = [start]
    return ids


def reward_scores(prompts: list[Any], completions: list[Any], params: RewardJudgeParams) -> list[float]:
    """``logits[:, 0]`` of the reward model for each prompt + completion."""
    import torch

    network, tokenizer = load_reward_model(params.model)
    device = next(network.parameters()).device
    pad = network.config.pad_token_id
    encoded = [encode(p, c, tokenizer, params.max_length) for p, c in zip(prompts, completions)]
    scores: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(encoded), params.batch_size):
            chunk = encoded[start : start + params.batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in chunk], device=device)
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in chunk], device=device)
            logits = network(input_ids=input_ids, attention_mask=mask).logits
            scores += logits[:, 0].float().tolist()
    return scores


def example_settings(workdir: Path) -> dict[str, Any]:
    """Settings that let the conformance checks score with this judge: an untrained reward model written to ``workdir``.

    It is the built-in demo model's architecture as a sequence classifier
    with one output, randomly initialised (seed 0), with the demo tokenizer.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    from molting.demo import demo_model_dir

    target = Path(workdir) / "reward-model"
    if not (target / "config.json").exists():
        config = AutoConfig.from_pretrained(demo_model_dir())
        config.num_labels = 1
        config.architectures = ["LlamaForSequenceClassification"]
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random state alone
            torch.manual_seed(0)
            network = LlamaForSequenceClassification(config)
        network.save_pretrained(target)
        AutoTokenizer.from_pretrained(demo_model_dir()).save_pretrained(target)
    return {"model": str(target)}


@molting.hookimpl
def molting_register_judges(register):
    register(
        Judge(
            name=NAME,
            score=reward_scores,
            description="A trained reward model's score of prompt + completion (default: the run's own reward model).",
            params=RewardJudgeParams,
            example=example_settings,
        )
    )
