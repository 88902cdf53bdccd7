"""The ``calculator`` environment: the demo task made harder, with a tool to do it.

Each episode asks a 3- or 4-digit sum (``demo-tool-prompts``, whose
``answer`` column is the sum) and offers one tool, ``calculator(expression)``
(:func:`molting.demo.calculator`). The model may call it (a Hermes
``<tool_call>`` block, as the demo model's chat template writes calls), reads
its result, and answers; the episode ends at the first turn without a call,
with reward 1 when that answer's last number is the sum, else 0. Calls
written wrongly, to an unknown tool or with bad arguments get an error the
model reads (and are counted); ``max_turns`` (3) bounds the episode.
"""

from __future__ import annotations

import attrs

import molting
from molting import demo
from molting.components import Environment
from molting.environments import ModelTurn, ToolEpisode


@attrs.frozen
class CalculatorParams:
    tool_timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    """Seconds a calculator call may take before the model reads a timeout error instead."""


class CalculatorEpisode(ToolEpisode):
    """One sum: the calculator on offer, reward 1 for the right final answer."""

    def __init__(self, prompt: list[dict[str, str]], answer: str, tool_timeout: float) -> None:
        super().__init__(prompt, [demo.calculator], tool_timeout)
        self.answer = answer

    def reward(self, turn: ModelTurn) -> float:
        return float(demo.tool_answer_correct(self.answer, turn.content))


def start(row, seed: int, params: CalculatorParams) -> CalculatorEpisode:
    """The episode of ``row`` (nothing is random in it: every seed starts it alike)."""
    return CalculatorEpisode(row["prompt"], str(row["answer"]), params.tool_timeout)


@molting.hookimpl
def molting_register_environments(register):
    register(Environment(name="calculator", start=start, params=CalculatorParams, max_turns=3,
                         default_data="demo-tool-prompts",
                         description="3- and 4-digit sums with a calculator tool; reward 1 for the right final answer."))
