"""The environment author's tests: the conformance suite, plus the game's own rules."""

from __future__ import annotations

import asyncio

from molting.environments import ModelTurn
from molting.testing import DatasetTests, EnvironmentTests
from molting.tools import ToolCall
from molting_guess import GuessParams, start


class TestGuessConformance(EnvironmentTests):
    name = "guess-number"  # looked up through the entry point, as `molting run --env guess-number` does


class TestPromptsConformance(DatasetTests):
    name = "guess-prompts"


def test_a_binary_search_finds_the_number_and_pays_for_each_guess():
    episode = asyncio.run(start({"prompt": "Find it."}, seed=3, params=GuessParams()))
    low, high, turns = 1, 20, 0
    while True:
        middle = (low + high) // 2
        answer = asyncio.run(episode.step(ModelTurn("", "", tool_calls=(ToolCall("guess", {"number": middle}),))))
        turns += 1
        said = answer.observation[0]["content"]
        if said == "right":
            break
        low, high = (middle + 1, high) if said == "higher" else (low, middle - 1)
    final = asyncio.run(episode.step(ModelTurn(f"It is {middle}.", f"It is {middle}.")))
    assert final.done and final.reward == 1.0 - 0.05 * turns
