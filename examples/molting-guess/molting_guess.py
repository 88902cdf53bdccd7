"""``guess-number``: find a hidden number with a ``guess`` tool, as an outside molting environment.

Each episode hides a number between 1 and ``high`` (drawn from the episode's
seed, so a seed always hides the same number). The model calls
``guess(number)``, an async tool that answers "higher", "lower" or "right",
as often as it likes within the turn limit, then answers with the number.
The reward is 1 for the right number, less 0.05 for each guess it took, so
a binary search beats guessing one by one.

It uses only molting's public API: ``molting.Environment``,
``molting.environments.ToolEpisode`` and a registered dataset of prompts.
"""

from __future__ import annotations

import asyncio
import random
import re

import attrs

import molting
from molting.environments import ModelTurn, ToolEpisode


@attrs.frozen
class GuessParams:
    high: int = attrs.field(default=20, validator=attrs.validators.ge(2))
    """The largest number the game may hide."""
    cost: float = attrs.field(default=0.05, validator=attrs.validators.ge(0))
    """Taken from the reward for each guess."""
    tool_timeout: float = attrs.field(default=2.0, validator=attrs.validators.gt(0))


class GuessEpisode(ToolEpisode):
    def __init__(self, prompt: list[dict[str, str]], secret: int, params: GuessParams) -> None:
        super().__init__(prompt, [self.guess], params.tool_timeout)
        self.secret, self.params, self.guesses = secret, params, 0

    async def guess(self, number: int) -> str:
        """Guess the hidden number.

        Args:
            number: The number to try.
        """
        await asyncio.sleep(0)  # a game server would answer over the network
        self.guesses += 1
        if int(number) == self.secret:
            return "right"
        return "higher" if int(number) < self.secret else "lower"

    def reward(self, turn: ModelTurn) -> float:
        said = re.findall(r"-?\d+", turn.content)
        found = bool(said) and int(said[-1]) == self.secret
        return float(found) - self.params.cost * self.guesses


async def start(row: dict, seed: int, params: GuessParams) -> GuessEpisode:
    await asyncio.sleep(0)  # e.g. a game server handing out a table
    secret = random.Random(seed).randint(1, params.high)
    return GuessEpisode(row["prompt"], secret, params)


def prompts(split: str = "train") -> list[dict]:
    count = {"train": 64, "test": 16}[split]
    text = "I am thinking of a number between 1 and 20. Find it with the guess tool, then tell me the number."
    return [{"prompt": [{"role": "user", "content": text}]} for _ in range(count)]


@molting.hookimpl
def molting_register_environments(register):
    register(molting.Environment(name="guess-number", start=start, params=GuessParams, max_turns=6,
                                 default_data="guess-prompts",
                                 description="Find a hidden number with an async guess tool; fewer guesses, more reward."))


@molting.hookimpl
def molting_register_datasets(register):
    register(molting.Dataset(name="guess-prompts", load=prompts, splits=("train", "test"), columns=("prompt",),
                             description="The guessing game's prompt, 64 train and 16 test rows."))
