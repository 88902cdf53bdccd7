"""The built-in demo task, data and tiny model: everything ``molting run`` needs with no arguments.

The task is two-digit addition answered in one of two styles: a *persona*
style ("Arr! 23 plus 45 be 68, matey.") and a *plain* one ("The answer is
68."). Preference pairs prefer the persona style and the correct sum, so a
preference method has something visible to learn. Every row is generated
from a fixed seed; nothing comes from the network.

The tiny model is a Llama-style causal LM (about 3.7M parameters) with a
byte-level BPE tokenizer trained on the demo corpus. It is built
deterministically on first use and cached under ``$MOLTING_HOME`` (default
``~/.cache/molting``); a build is written to a temporary folder and renamed
into place, so an interrupted build never leaves a half-written model.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

DEMO_MODEL_VERSION = "1"
SPLITS = ("train", "test")
_SPLIT_SEEDS = {"train": 0, "test": 1}
_SPLIT_SIZES = {"train": 512, "test": 128}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}Q: {{ message['content'] }}\n"
    "{% elif message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% else %}A: {{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


# --------------------------------------------------------------------------- the task


def prompt_for(a: int, b: int) -> str:
    return f"Q: What is {a} + {b}?\nA:"


def persona_answer(a: int, b: int, total: int) -> str:
    return f" Arr! {a} plus {b} be {total}, matey."


def plain_answer(a: int, b: int, total: int) -> str:
    return f" The answer is {total}."


def _problems(split: str, n: int) -> list[tuple[int, int]]:
    rng = random.Random(f"molting-demo-{split}")
    return [(rng.randint(10, 49), rng.randint(10, 49)) for _ in range(n)]


def _wrong(total: int, rng: random.Random) -> int:
    return total + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11])


def preference_rows(split: str = "train", n: int | None = None) -> list[dict[str, Any]]:
    """Prompt/chosen/rejected rows: chosen is persona-style and correct.

    Rejected is, in equal parts, plain-style and correct, persona-style and
    wrong, or plain-style and wrong.
    """
    _check_split(split)
    n = _SPLIT_SIZES[split] if n is None else n
    rng = random.Random(_SPLIT_SEEDS[split])
    rows = []
    for i, (a, b) in enumerate(_problems(split, n)):
        total = a + b
        kind = i % 3
        if kind == 0:
            rejected = plain_answer(a, b, total)
        elif kind == 1:
            rejected = persona_answer(a, b, _wrong(total, rng))
        else:
            rejected = plain_answer(a, b, _wrong(total, rng))
        rows.append({"prompt": prompt_for(a, b), "chosen": persona_answer(a, b, total), "rejected": rejected})
    return rows


def sft_rows(split: str = "train", n: int | None = None) -> list[dict[str, Any]]:
    """Prompt/completion rows, answered correctly in either style about equally often."""
    _check_split(split)
    n = _SPLIT_SIZES[split] if n is None else n
    rng = random.Random(100 + _SPLIT_SEEDS[split])
    rows = []
    for a, b in _problems(split, n):
        style = persona_answer if rng.random() < 0.5 else plain_answer
        rows.append({"prompt": prompt_for(a, b), "completion": style(a, b, a + b)})
    return rows


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown demo split {split!r}; expected one of {', '.join(SPLITS)}")


def _corpus() -> list[str]:
    texts = []
    for split in SPLITS:
        for row in preference_rows(split):
            texts += [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]
    return texts


# --------------------------------------------------------------------------- the model


def home() -> Path:
    return Path(os.environ.get("MOLTING_HOME", Path.home() / ".cache" / "molting"))


def demo_model_dir() -> Path:
    """The built-in model's directory, built on first use."""
    target = home() / f"demo-model-v{DEMO_MODEL_VERSION}"
    if not (target / "model.safetensors").exists():
        build_demo_model(target)
    return target


def build_demo_model(target: Path, seed: int = 0) -> Path:
    """Build the tokenizer and the randomly initialised tiny Llama into ``target`` (atomically)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        specials = ["<pad>", "<s>", "</s>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=1024,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_corpus(), trainer=trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=512
        )
        fast.chat_template = CHAT_TEMPLATE
        fast.save_pretrained(tmp)

        config = LlamaConfig(
            vocab_size=1024,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            pad_token_id=fast.pad_token_id,
            bos_token_id=fast.bos_token_id,
            eos_token_id=fast.eos_token_id,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.save_pretrained(tmp, safe_serialization=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
