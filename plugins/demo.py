"""The built-in demo data sets and rule judge: two-digit addition in a persona style or a plain one.

See :mod:`molting.demo` for how the rows are generated. Each data set has a
``train`` and a held-out ``test`` split.
"""

from __future__ import annotations

import molting
from molting import demo
from molting.components import Dataset, Judge


@molting.hookimpl
def molting_register_datasets(register):
    register(
        Dataset(
            name="demo-preference",
            load=demo.preference_rows,
            description="Addition pairs preferring the persona style and the correct sum (512 train, 256 test).",
            splits=demo.SPLITS,
            demo=True,
            columns=("prompt", "chosen", "rejected"),
        )
    )
    register(
        Dataset(
            name="demo-sft",
            load=demo.sft_rows,
            description="Addition prompts answered correctly, half in the persona style (512 train, 256 test).",
            splits=demo.SPLITS,
            demo=True,
            columns=("prompt", "completion"),
        )
    )
    register(
        Dataset(
            name="demo-unpaired",
            load=demo.unpaired_rows,
            description="The demo preference pairs unpaired: the persona-style correct answer labelled true, the other false.",
            splits=demo.SPLITS,
            demo=True,
            columns=("prompt", "completion", "label"),
        )
    )
    register(
        Dataset(
            name="demo-prompts",
            load=demo.prompt_rows,
            description="Addition prompts with the sum as reference `answer`, for online stages (512 train, 256 test).",
            splits=demo.SPLITS,
            demo=True,
            columns=("prompt", "answer"),
        )
    )
    register(
        Dataset(
            name="demo-persona-logs",
            load=demo.persona_logs,
            description="Conversation logs: sam asks sums, captain answers in the persona style (--persona-role captain).",
            splits=demo.SPLITS,
            demo=True,
            columns=("messages",),
        )
    )


    register(
        Dataset(
            name="demo-tool-prompts",
            load=demo.tool_prompt_rows,
            description="3- and 4-digit sums as chat prompts with the sum as `answer`: the calculator environment's.",
            splits=demo.SPLITS,
            columns=("prompt", "answer"),
        )
    )
    register(
        Dataset(
            name="demo-tool-sft",
            load=demo.tool_sft_rows,
            description="Tool-use demonstrations of the calculator task: the call, then the answer after its result.",
            splits=demo.SPLITS,
            columns=("prompt", "completion", "tools"),
        )
    )


def _rule_scores(prompts, completions, params):
    return [demo.score(p, c) for p, c in zip(prompts, completions)]


@molting.hookimpl
def molting_register_judges(register):
    register(
        Judge(
            name="demo-rule",
            score=_rule_scores,
            description="Demo task rule judge: 0.5 for the right sum plus 0.5 for the persona style.",
        )
    )
