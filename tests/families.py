"""Tiny random-weight models of real families, each with a tokenizer in that family's published format.

Nothing is fetched: each family's model is built from its transformers
config class with tiny sizes, and its tokenizer is a small BPE trained here
on a few hundred words, carrying the family's special tokens (BOS, EOS, end
of turn, pad, or the lack of one), whether it adds a BOS itself, and its
chat template. The templates of Llama 3, Qwen2.5, Qwen3, Gemma (2) and
Gemma 3 and Phi-3 are the originals that trl ships for recognising them
(``trl/chat_templates``); Mistral's, OLMo 2's and SmolLM3's follow their
published formats and are written here. GPT-2 and Pythia have no template:
they train on text.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}{{- '[INST] ' + system_message + '\\n\\n' + message['content']"
    " + '[/INST]' }}{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
"""Mistral Instruct: ``<s>[INST] … [/INST] answer</s>``, a system message in front of the first user turn."""

OLMO2 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}{% if not loop.last %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}{% else %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
)
"""OLMo 2 Instruct: ``<|user|>\\n…\\n<|assistant|>\\n…<|endoftext|>`` (Tülu's format)."""

SMOLLM3 = (
    "{%- set think = not (messages[0]['role'] == 'system' and '/no_think' in messages[0]['content']) -%}"
    "{{- '<|im_start|>system\\n## Metadata\\n\\nKnowledge Cutoff Date: June 2025\\nReasoning Mode: ' }}"
    "{{- '/think' if think else '/no_think' }}{{- '\\n\\n## Custom Instructions\\n\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'].replace('/no_think', '').strip() }}"
    "{%- else %}{{- 'You are a helpful AI assistant named SmolLM, trained by Hugging Face.' }}{%- endif %}"
    "{{- '\\n\\n<|im_end|>\\n' }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{{- '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n' }}{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{%- if not think %}{{- '<think>\\n\\n</think>\\n' }}{%- endif %}"
    "{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if not think %}{{- '<think>\\n\\n</think>\\n' }}{%- endif %}{%- endif %}"
)
"""SmolLM3: ChatML with a metadata system block; ``/no_think`` in the system prompt writes an empty thinking block."""

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)


@dataclass(frozen=True)
class Family:
    """One model family: its config, its tokenizer's special tokens and template, and what it ties."""

    name: str
    config: str
    """The transformers config class."""
    eos: str
    bos: str | None = None
    pad: str | None = None
    adds_bos: bool = False
    """The tokenizer puts its BOS in front of every text it encodes (Llama, Gemma, Mistral)."""
    end_of_turn: str | None = None
    """A second token generation stops at, when the template ends turns with something other than EOS."""
    specials: tuple[str, ...] = ()
    template: str | None = None
    """A template trl ships (``trl:NAME``) or the template's text; ``None``: no chat template."""
    tied: bool = False
    sentencepiece: bool = False
    """A sentencepiece-style vocabulary (``▁`` marks a word start) rather than byte-level BPE."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Config settings of this family beyond :data:`SIZES`."""
    sdpa: bool = True
    """Its attention runs on PyTorch's SDPA, so packed (padding-free) batches work."""

    @property
    def chat(self) -> bool:
        return self.template is not None


FAMILIES = {f.name: f for f in (
    Family("llama3", "LlamaConfig", eos="<|eot_id|>", bos="<|begin_of_text|>", adds_bos=True, template="trl:llama3",
           specials=("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"), extra={"rope_theta": 500000.0}),
    Family("qwen2.5", "Qwen2Config", eos="<|im_end|>", pad="<|endoftext|>", template="trl:qwen2_5", tied=True,
           specials=("<|im_start|>",)),
    Family("qwen3", "Qwen3Config", eos="<|im_end|>", pad="<|endoftext|>", template="trl:qwen3", tied=True,
           specials=("<|im_start|>", "<think>", "</think>"), extra={"head_dim": 16}),
    Family("gemma2", "Gemma2Config", eos="<eos>", bos="<bos>", pad="<pad>", adds_bos=True, end_of_turn="<end_of_turn>",
           specials=("<start_of_turn>",), template="trl:gemma", tied=True, sentencepiece=True,
           extra={"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64}, sdpa=False),
    Family("gemma3", "Gemma3TextConfig", eos="<eos>", bos="<bos>", pad="<pad>", adds_bos=True,
           end_of_turn="<end_of_turn>", specials=("<start_of_turn>",), template="trl:gemma3", tied=True,
           sentencepiece=True, extra={"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64}),
    Family("mistral", "MistralConfig", eos="</s>", bos="<s>", adds_bos=True, specials=("[INST]", "[/INST]"),
           template=MISTRAL, sentencepiece=True),
    Family("phi3", "Phi3Config", eos="<|endoftext|>", bos="<s>", pad="<|endoftext|>", end_of_turn="<|end|>",
           specials=("<|system|>", "<|user|>", "<|assistant|>"), template="trl:phi3", sentencepiece=True),
    Family("gpt2", "GPT2Config", eos="<|endoftext|>", bos="<|endoftext|>", tied=True),
    Family("pythia", "GPTNeoXConfig", eos="<|endoftext|>", bos="<|endoftext|>"),
    Family("olmo2", "Olmo2Config", eos="<|endoftext|>", bos="<|endoftext|>", pad="<|pad|>", template=OLMO2,
           specials=("<|system|>", "<|user|>", "<|assistant|>")),
    Family("smollm3", "SmolLM3Config", eos="<|im_end|>", pad="<|im_end|>", template=SMOLLM3, tied=True,
           specials=("<|im_start|>", "<think>", "</think>")),
)}

WORDS = (
    "the a an is are was what how why who when which answer question sum of plus and to in on it yes no maybe "
    "system user assistant model you helpful briefly please think reasoning mode metadata knowledge cutoff date june "
    "custom instructions named trained by hugging face qwen created alibaba cloud one two three four five six seven "
    "eight nine ten zero sky blue green red i think sure here that this be do not can will with for as at from"
)


def template_text(family: Family) -> str | None:
    if family.template is None or not family.template.startswith("trl:"):
        return family.template
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{family.template[4:]}.jinja").read_text()


def build_tokenizer(family: Family):
    """A ~600-token tokenizer with ``family``'s special tokens, BOS behaviour and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(t for t in (family.bos, family.eos, family.pad, family.end_of_turn, *family.specials)
                                  if t is not None))
    alphabet = [chr(c) for c in range(32, 127)] + ["\n"]
    if family.sentencepiece:
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        specials = ["<unk>", *specials]
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=alphabet + ["▁"])
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [WORDS, WORDS.upper(), " ".join(str(n) for n in range(200)), "".join(alphabet) * 3]
    tokenizer.train_from_iterator(corpus * 20, trainer)
    if family.adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[(family.bos, tokenizer.token_to_id(family.bos))])
    elif not family.sentencepiece:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=family.bos, eos_token=family.eos, pad_token=family.pad,
        unk_token="<unk>" if family.sentencepiece else None, chat_template=template_text(family),
        additional_special_tokens=[t for t in family.specials if t.startswith(("<|", "<start", "[", "<think", "</"))],
    )


def build_model(family: Family, directory: Path) -> Path:
    """Write ``family``'s tiny random-weight model and tokenizer to ``directory`` (safetensors)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(family)
    ids = {name: tokenizer.convert_tokens_to_ids(token) if token else None
           for name, token in (("bos", family.bos), ("eos", family.eos), ("pad", family.pad),
                               ("end_of_turn", family.end_of_turn))}
    sizes = dict(SIZES)
    if family.config == "GPT2Config":
        sizes = dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024)
    config = getattr(transformers, family.config)(
        vocab_size=len(tokenizer), tie_word_embeddings=family.tied, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        pad_token_id=ids["pad"], **sizes, **family.extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    stops = [ids["eos"]] + ([ids["end_of_turn"]] if ids["end_of_turn"] is not None else [])
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.bos_token_id, model.generation_config.pad_token_id = ids["bos"], ids["pad"]
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@functools.lru_cache(maxsize=None)
def family_model(name: str, root: str) -> Path:
    """``name``'s model under ``root`` (built once per test session)."""
    directory = Path(root) / name
    if not (directory / "config.json").is_file():
        build_model(FAMILIES[name], directory)
    return directory


def text_length(prompts, completions, **columns):
    """A judge with a spread on random-weight models' answers (the ``python`` judge's ``families:text_length``)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(len(t)) for t in texts]
