"""A sampler that answers from a script: the tests' stand-in for a model that already uses tools.

The demo model has not learnt to call tools, so tests that need episodes
with calls in them (a right one, a wrong one, one written badly) script the
model's turns: ``script(conversation_text, turn, seed) -> text`` says what the
"model" writes next (``seed``: the turn's random stream, for a script that
varies like a sampling model), and :class:`ScriptedSampler` turns that into the token
ids and masks a real sampler returns (:func:`molting.sampling.samples_from_ids`),
an end-of-sequence token after each turn unless the script's text runs past
``max_new_tokens`` (then it is cut, as a real turn would be). Everything else
— the environment, the tools, the parser, the rollout, the stage — is the
real thing.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import molting
from molting.sampling import SamplingRequest, encode_prompts, samples_from_ids


def script_turn(script: Callable[..., str], request: SamplingRequest) -> Any:
    tokenizer = request.tokenizer
    prompts = encode_prompts(request.prompts, tokenizer, request.max_prompt_length, request.prompt_ids)
    seeds = list(request.seeds) if request.seeds is not None else [0] * len(prompts)
    completions = []
    for ids, seed in zip(prompts, seeds):
        text = tokenizer.decode(ids)
        turn = text.count("A:") - 1  # the demo template opens each assistant turn with "A:"
        said = script(text, turn, seed) if script.__code__.co_argcount == 3 else script(text, turn)
        tokens = tokenizer(said, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        completions.append(tokens[: request.max_new_tokens])
    return samples_from_ids(request, [i for i in range(len(prompts))], prompts, completions)


def question(text: str) -> tuple[int, int]:
    a, b = re.search(r"What is (\d+) \+ (\d+)\?", text).groups()
    return int(a), int(b)


def call(expression: str) -> str:
    return f' <tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}\n</tool_call>'


def good_student(text: str, turn: int) -> str:
    """Calls the calculator on the question, then answers with its result."""
    a, b = question(text)
    if turn == 0:
        return call(f"{a} + {b}")
    result = re.findall(r"R: (-?\d+)", text)[-1]
    return f" The answer is {result}."


def mixed_student(text: str, turn: int, seed: int) -> str:
    """Calls the calculator, then answers right when its seed is a multiple of 3, else wrong: rewards that vary."""
    if turn == 0:
        return good_student(text, 0)
    return good_student(text, turn) if seed % 3 == 0 else " The answer is 7."


def sampler_plugin(name: str, script: Callable[..., str]) -> Any:
    class Plugin:
        @molting.hookimpl
        def molting_register_samplers(self, register):
            register(molting.Sampler(name=name, sample=lambda request: script_turn(script, request),
                                     description="Answers from a test's script."))

    return Plugin()
