"""Deliberately broken environments and tool parsers: each must fail the conformance check named beside it.

Each is a small real component on molting's public API (``molting.environments``, ``molting.tools``) that gets
one thing wrong, the way an environment author plausibly would.
"""

from __future__ import annotations

import asyncio
import random

import molting
from molting import demo
from molting.environments import Episode, ToolEpisode, Turn
from molting.tools import ParsedTurn, ToolCall, json_call


class Sum(ToolEpisode):
    """The calculator's episode, the base the broken ones change."""

    def __init__(self, row, tools=(demo.calculator,)):
        super().__init__(row["prompt"], list(tools))
        self.answer = row["answer"]

    def reward(self, turn):
        return float(demo.tool_answer_correct(self.answer, turn.content))


class Unseeded(Sum):  # draws its bonus from the global random state, not from the seed it was given
    def reward(self, turn):
        return super().reward(turn) + random.random()


class Fragile(Sum):  # trusts the model to write its calls well
    async def step(self, turn):
        if turn.malformed:
            raise ValueError(f"cannot parse {turn.malformed[0]}")
        return await super().step(turn)


class Dicts(Sum):  # answers with a plain dict, not a Turn
    def step(self, turn):
        return {"observation": [], "reward": 0.0, "done": True}


class Mute(Episode):  # keeps the episode going without saying anything
    def step(self, turn):
        return Turn(reward=0.0, done=False)


class OwnLoop(Sum):  # a sync step that starts an event loop of its own: fine alone, broken inside a running one
    def step(self, turn):
        return asyncio.run(ToolEpisode.step(self, turn))


def environment(name, episode, **overrides):
    settings = {"default_data": "demo-tool-prompts", "max_turns": 3, **overrides}
    return molting.Environment(name=name, start=lambda row, seed, params: episode(row),
                               description=f"Broken on purpose: {name}.", **settings)


def parser(name, parse, render):
    return molting.ToolParser(name=name, parse=parse, render=render, description=f"Broken on purpose: {name}.")


def _strict(text):  # raises on a call it cannot read instead of reporting it
    start = text.find("<call>")
    if start < 0:
        return ParsedTurn(text.strip())
    found = json_call(text[start + 6 : text.index("</call>")])
    if isinstance(found, str):
        raise ValueError(found)
    return ParsedTurn(text[:start].strip(), (found,))


def _render(calls):
    import json

    return "".join(f"<call>{json.dumps({'name': c.name, 'arguments': dict(c.arguments)})}</call>" for c in calls)


def _names_only(text):  # forgets the arguments
    parsed = _strict(text)
    return ParsedTurn(parsed.content, tuple(ToolCall(c.name, {}) for c in parsed.calls), parsed.malformed)


def _greedy(text):  # takes every turn for a call
    return ParsedTurn("", (ToolCall("answer", {"text": text}),))


BROKEN = {
    # component → the check it must fail, and a phrase of the message
    "unseeded": (environment("unseeded", Unseeded), "env-reset-deterministic",
                 "draw any randomness from the seed start() gets"),
    "fragile": (environment("fragile", Fragile), "env-answers-bad-turns",
                "step() raised ValueError on the model turn"),
    "dicts": (environment("dicts", Dicts), "env-step-contract", "step() returned dict, not a molting.environments.Turn"),
    "mute": (environment("mute", lambda row: Mute(row["prompt"])), "env-step-contract",
             "a turn that does not end the episode must say something"),
    "own-loop": (environment("own-loop", OwnLoop), "env-ends-within-turn-limit",
                 "asyncio.run() cannot be called from a running event loop"),
    "strict": (parser("strict", _strict, _render), "parser-never-raises", "raised ValueError"),
    "names-only": (parser("names-only", _names_only, _render), "parser-reads-what-it-renders", "and read back"),
    "greedy": (parser("greedy", _greedy, _render), "parser-leaves-plain-text", "expected the text back and no calls"),
}
