"""The built-in demo data sets and rule judge: two-digit addition in a persona style or a plain one.

See :mod:`molting.demo` for how the rows are generated. Each data set has a
``train`` and a held-out ``test`` split.
"""

from __future__ import annotations

import molting
from molting import demo
from molting.components import Dataset, Judge


#: (name, rows, description, columns, whether held-out evaluation on the demo split applies)
_DATASETS = (
    ("demo-preference", demo.preference_rows,
     "Addition pairs preferring the persona style and the correct sum (512 train, 256 test).",
     ("prompt", "chosen", "rejected"), True),
    ("demo-sft", demo.sft_rows,
     "Addition prompts answered correctly, half in the persona style (512 train, 256 test).",
     ("prompt", "completion"), True),
    ("demo-unpaired", demo.unpaired_rows,
     "The demo preference pairs unpaired: the persona-style correct answer labelled true, the other false.",
     ("prompt", "completion", "label"), True),
    ("demo-prompts", demo.prompt_rows,
     "Addition prompts with the sum as reference `answer`, for online stages (512 train, 256 test).",
     ("prompt", "answer"), True),
    ("demo-persona-logs", demo.persona_logs,
     "Conversation logs: sam asks sums, captain answers in the persona style (--persona-role captain).",
     ("messages",), True),
    ("demo-tool-prompts", demo.tool_prompt_rows,
     "3- and 4-digit sums as chat prompts with the sum as `answer`: the calculator environment's.",
     ("prompt", "answer"), False),
    ("demo-tool-sft", demo.tool_sft_rows,
     "Tool-use demonstrations of the calculator task: the call, then the answer after its result.",
     ("prompt", "completion", "tools"), False),
)


@molting.hookimpl
def molting_register_datasets(register):
    for name, load, description, columns, evaluated in _DATASETS:
        register(Dataset(name=name, load=load, description=description, splits=demo.SPLITS, demo=evaluated,
                         columns=columns))


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
