"""The built-in demo task, its data sets, its rule judge and its tiny model.

The task is two-digit addition answered in one of two styles: a *persona*
style (" Arr! 23 plus 45 be 68, matey.") and a *plain* one (" The answer is
68."). The demo model was fine-tuned on answers in both styles about equally
often, so it answers in the persona style about half the time; the
preference data prefers the persona style and the correct sum, so a
preference method has something visible to learn: the persona rate should
approach 100% without the sums getting worse.

Problems are split once: 256 held-out (``test``) problems that no training
set contains, the rest for training. Every row is generated from a fixed
seed; nothing comes from the network.

The tiny model (a 3.5M-parameter Llama and its byte-level BPE tokenizer)
ships inside the package, in ``molting/demo_model``; ``scripts/build_demo_model.py``
produces it from this module's data.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

SPLITS = ("train", "test")
_SPLIT_SIZES = {"train": 512, "test": 256}
LOW, HIGH = 10, 49
MODEL_DIR = Path(__file__).parent / "demo_model"
TOOL_MODEL_DIR = Path(__file__).parent / "demo_tool_model"
BUILT_IN_MODELS = {"demo": MODEL_DIR, "demo-tools": TOOL_MODEL_DIR}
"""The models shipped in the package, by the name ``--model`` takes. ``demo`` (the default) learnt the demo task;
``demo-tools`` learnt it and, besides, to quote numbers from earlier lines (``scripts/build_demo_model.py
--tools``), which the calculator demo's tool calls and answers need."""

CHAT_TEMPLATE = (
    "{% if tools %}Tools: {% for tool in tools %}{{ (tool.function or tool).name }}{{ ', ' if not loop.last }}"
    "{% endfor %}{{ '\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}Q: {{ message['content'] }}\n"
    "{% elif message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'tool' %}R: {{ message['content'] }}\n"
    "{% else %}A: {{ message['content'] }}{% for call in message.tool_calls or [] %}<tool_call>\n"
    '{"name": "{{ (call.function or call).name }}", "arguments": {{ (call.function or call).arguments | tojson }}}'
    "\n</tool_call>{% endfor %}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)
"""The demo model's chat template: ``Q: ...`` / ``A: ...</s>``; with tools, a ``Tools: NAME, ...`` line first, tool
calls as Hermes ``<tool_call>`` blocks and tool results as ``R: ...`` lines."""

# --------------------------------------------------------------------------- the task

PERSONA = re.compile(r"^\s*Arr! \d+ plus \d+ be (-?\d+), matey\.\s*$")
PLAIN = re.compile(r"^\s*The answer is (-?\d+)\.\s*$")
PROMPT = re.compile(r"What is (\d+) \+ (\d+)\?")


def prompt_for(a: int, b: int) -> str:
    return f"Q: What is {a} + {b}?\nA:"


def persona_answer(a: int, b: int, total: int) -> str:
    return f" Arr! {a} plus {b} be {total}, matey."


def plain_answer(a: int, b: int, total: int) -> str:
    return f" The answer is {total}."


def grade(prompt: str, completion: str) -> dict[str, bool]:
    """``{"correct", "persona", "plain"}`` for one answer to a demo prompt.

    ``correct``: the answer states the right sum (in either style);
    ``persona`` / ``plain``: the answer is exactly in that style.
    """
    match = PROMPT.search(prompt)
    if match is None:
        raise ValueError(f"not a demo prompt: {prompt!r}")
    total = int(match.group(1)) + int(match.group(2))
    persona, plain = PERSONA.match(completion), PLAIN.match(completion)
    stated = persona or plain
    return {
        "correct": bool(stated and int(stated.group(1)) == total),
        "persona": bool(persona),
        "plain": bool(plain),
    }


def score(prompt: str, completion: str) -> float:
    """The rule judge's score in [0, 1]: half for the right sum, half for the persona style."""
    graded = grade(prompt, completion)
    return 0.5 * graded["correct"] + 0.5 * graded["persona"]


# --------------------------------------------------------------------------- the problems


@lru_cache(maxsize=None)
def problems(split: str) -> tuple[tuple[int, int], ...]:
    """All problems of a split: 256 held out for ``test``, the other 1,344 for ``train``."""
    _check_split(split)
    every = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    random.Random("molting-demo-split").shuffle(every)
    return tuple(every[:256]) if split == "test" else tuple(every[256:])


def _sample(split: str, n: int | None, salt: str) -> tuple[list[tuple[int, int]], random.Random]:
    rng = random.Random(f"molting-demo-{salt}-{split}")
    pool = problems(split)
    n = _SPLIT_SIZES[split] if n is None else n
    chosen = list(pool[:n]) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]
    return chosen, rng


def _wrong(total: int, rng: random.Random) -> int:
    return total + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown demo split {split!r}; expected one of {', '.join(SPLITS)}")


# --------------------------------------------------------------------------- the data sets


def sft_rows(split: str = "train", n: int | None = None) -> list[dict[str, Any]]:
    """Prompt/completion rows, answered correctly, in the persona style about half the time."""
    chosen, rng = _sample(split, n, "sft")
    rows = []
    for a, b in chosen:
        style = persona_answer if rng.random() < 0.5 else plain_answer
        rows.append({"prompt": prompt_for(a, b), "completion": style(a, b, a + b)})
    return rows


def preference_rows(split: str = "train", n: int | None = None) -> list[dict[str, Any]]:
    """Prompt/chosen/rejected rows: chosen is persona-style and correct.

    Rejected is, in equal parts, plain-style and correct, persona-style and
    wrong, or plain-style and wrong.
    """
    chosen, rng = _sample(split, n, "preference")
    rows = []
    for i, (a, b) in enumerate(chosen):
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


def unpaired_rows(split: str = "train", n: int | None = None) -> list[dict[str, Any]]:
    """Prompt/completion/label rows: label is True for a persona-style correct answer, else False."""
    rows = []
    for pair in preference_rows(split, n):
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows


def prompt_rows(split: str = "train", n: int | None = None) -> list[dict[str, Any]]:
    """Prompts with reference answers, for online methods: prompt, answer (the sum, as text)."""
    chosen, _ = _sample(split, n, "prompts")
    return [{"prompt": prompt_for(a, b), "answer": str(a + b)} for a, b in chosen]


PERSON, ASKER = "captain", "sam"
"""The speakers of the demo conversation logs: whose way of answering a persona run learns, and who asks."""


def persona_logs(split: str = "train", n: int | None = None, exchanges: int = 2) -> list[dict[str, Any]]:
    """Conversation logs of one person with a recognisable style, as OpenAI-style messages with speaker names.

    ``sam`` asks sums; ``captain`` answers each one correctly, always in the
    persona style. Each conversation holds ``exchanges`` questions (n
    conversations; 256 in ``train``, 128 in ``test``, on the split's
    problems). ``--persona-role captain`` makes them SFT rows whose prompts
    are rendered by the demo chat template exactly as the demo prompts are.
    """
    count = {"train": 256, "test": 128}[split] if n is None else n
    chosen, _ = _sample(split, count * exchanges, "persona-logs")
    logs = []
    for start in range(0, len(chosen), exchanges):
        messages = []
        for a, b in chosen[start : start + exchanges]:
            messages.append({"role": "user", "name": ASKER, "content": f"What is {a} + {b}?"})
            messages.append({"role": "assistant", "name": PERSON, "content": persona_answer(a, b, a + b).strip()})
        logs.append({"messages": messages})
    return logs


# --------------------------------------------------------------------------- the tool task


TOOL_DIGITS = ((3, 3), (3, 4), (4, 3), (4, 4))
"""Operand sizes of the tool task: sums the demo model cannot do in its head (it learnt two-digit ones)."""
_TOOL_SPLIT_SIZES = {"train": 2048, "test": 256}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return its value.

    Args:
        expression: The expression to evaluate, with numbers, + - * / and parentheses, e.g. "12 + 34".
    """
    import ast
    import operator

    operations = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in operations:
            return operations[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        raise ValueError(f"not an arithmetic expression: {expression!r}")

    result = value(ast.parse(expression.strip(), mode="eval").body)
    return str(int(result)) if float(result).is_integer() else f"{result:.6g}"


@lru_cache(maxsize=None)
def tool_problems(split: str) -> tuple[tuple[int, int], ...]:
    """The tool task's problems: 3- and 4-digit sums, 256 held out for ``test``, 2,048 for ``train``, disjoint."""
    _check_split(split)
    rng = random.Random("molting-demo-tool-split")
    seen: set[tuple[int, int]] = set()
    every: list[tuple[int, int]] = []
    while len(every) < sum(_TOOL_SPLIT_SIZES.values()):
        digits_a, digits_b = TOOL_DIGITS[len(every) % len(TOOL_DIGITS)]
        pair = (rng.randrange(10 ** (digits_a - 1), 10**digits_a), rng.randrange(10 ** (digits_b - 1), 10**digits_b))
        if pair not in seen:
            seen.add(pair)
            every.append(pair)
    test = _TOOL_SPLIT_SIZES["test"]
    return tuple(every[:test]) if split == "test" else tuple(every[test:])


def tool_question(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is {a} + {b}?"}]


def tool_prompt_rows(split: str = "train", n: int | None = None) -> list[dict[str, Any]]:
    """The tool task's prompts (message lists) with reference answers: prompt, answer (the sum, as text)."""
    chosen = tool_problems(split)[:n]
    return [{"prompt": tool_question(a, b), "answer": str(a + b)} for a, b in chosen]


def tool_sft_rows(split: str = "train", n: int | None = None) -> list[dict[str, Any]]:
    """Demonstrations of the tool task: for each problem, the turn that calls ``calculator`` and, after its
    result, the turn that answers ("The answer is N."): two prompt/completion rows with the tool's schema in
    ``tools`` (the chat template lists the tools)."""
    from transformers.utils import get_json_schema

    tools = [get_json_schema(calculator)]
    rows = []
    for a, b in tool_problems(split)[:n]:
        question = tool_question(a, b)
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": f"{a} + {b}"}}}]}
        result = {"role": "tool", "name": "calculator", "content": calculator(f"{a} + {b}")}
        rows.append({"prompt": question, "completion": [call], "tools": tools})
        rows.append({"prompt": question + [call, result],
                     "completion": [{"role": "assistant", "content": plain_answer(a, b, a + b).strip()}], "tools": tools})
    return rows


def tool_answer_correct(answer: Any, content: str) -> bool:
    """Whether a final answer states ``answer`` (the last number in it, as the plain and persona styles end)."""
    numbers = re.findall(r"-?\d+", content)
    return bool(numbers) and numbers[-1] == str(answer).strip()


def corpus() -> list[str]:
    """Every text the tokenizer is trained on: both styles of every problem, right and wrong."""
    texts = []
    for split in SPLITS:
        for a, b in problems(split):
            for total in (a + b, a + b + 1, a + b - 10):
                texts += [prompt_for(a, b) + persona_answer(a, b, total), prompt_for(a, b) + plain_answer(a, b, total)]
    return texts


# --------------------------------------------------------------------------- the model


def demo_model_dir(name: str = "demo") -> Path:
    """The directory of a built-in model (:data:`BUILT_IN_MODELS`), shipped inside the package."""
    path = BUILT_IN_MODELS[name]
    if not (path / "model.safetensors").exists():
        from molting.errors import ModelError

        build = "python scripts/build_demo_model.py" + (" --tools" if name == "demo-tools" else "")
        raise ModelError(f"the built-in model {name!r} is missing from {path}; rebuild it with `{build}`")
    return path


def build_tokenizer():
    """A byte-level BPE tokenizer (vocabulary 1024, digits split) trained on :func:`corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=512
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def init_model(tokenizer: Any, seed: int = 0):
    """The randomly initialised tiny Llama (hidden 256, 4 layers, vocabulary 1024, tied embeddings)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
