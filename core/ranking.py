"""Ranking sampled completions into chosen/rejected pairs: what the stages that judge their own samples share.

``sample-pairs`` writes the pairs as data; online DPO trains on them at once.
No torch here: ranking is plain Python over scores, so it is easy to test
and to read. Two kinds of judge rank the completions:

* **pointwise** judges (``demo-rule``, ``rule``, ``reward-model``, ...) score
  each completion; the run's judges are summed by weight
  (:class:`molting.judging.Scorer`). The best completion is chosen, the
  worst rejected.
* a **pairwise** judge (``llm-pairwise``) says which of two completions is
  better. With two samples per prompt its verdict is the pair; with more,
  every two distinct completions are compared and each one's wins counted
  (an undecided comparison is half a win each), then best against worst as
  above.

A *tie* is a prompt whose best and worst completions scored the same, or
read the same: the judge could not tell them apart, so the pair teaches
nothing: sample-pairs writes no pair for it; online DPO leaves it out of the
loss or, as trl's ``OnlineDPOTrainer`` does, trains on it with the first
completion chosen.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import attrs


@attrs.frozen
class Pair:
    """One prompt's pair: indices into its group of completions, and whether the judge could tell them apart."""

    chosen: int
    rejected: int
    tie: bool


@attrs.frozen
class Ranking:
    """The pairs of a batch of prompts, in prompt order, and the scores behind them.

    ``scores`` holds each completion's total score (missing-EOS penalty
    included), grouped by prompt as the samples are; a pairwise judge gives
    no scores, only wins, so it is ``None`` then.
    """

    pairs: list[Pair]
    scores: list[float] | None
    wins: list[float] | None = None
    """Each completion's wins, with a pairwise judge."""


def best_against_worst(scores: Sequence[float], texts: Sequence[str]) -> Pair:
    """The first of the highest scores chosen, the last of the lowest rejected.

    With two completions and equal scores this is trl's rule (the first is
    chosen when ``first >= second``), so keeping ties reproduces trl; a tie is
    equal scores or the same text on both sides. A NaN score (a judgement
    the run skipped: ``judge_on_error: skip``) takes no part; with fewer than
    two judged completions the prompt is a tie.
    """
    judged = [i for i, score in enumerate(scores) if not math.isnan(score)]
    if len(judged) < 2:
        return Pair(0, 0, tie=True)
    best = max(judged, key=lambda i: scores[i])
    worst = min(reversed(judged), key=lambda i: scores[i])
    return Pair(best, worst, tie=scores[best] == scores[worst] or texts[best] == texts[worst])


def comparisons(texts: Sequence[str]) -> list[tuple[int, int]]:
    """Every two completions a pairwise judge compares: each pair once, identical texts not at all."""
    return [(i, j) for i, j in itertools.combinations(range(len(texts)), 2) if texts[i] != texts[j]]


def wins(count: int, compared: Sequence[tuple[int, int]], verdicts: Sequence[int]) -> list[float]:
    """Each completion's wins: a verdict 0 or 1 names the better of a compared pair, -1 gives half a win each."""
    won = [0.0] * count
    for (i, j), verdict in zip(compared, verdicts):
        if verdict == -1:
            won[i] += 0.5
            won[j] += 0.5
        else:
            won[(i, j)[verdict]] += 1.0
    return won


def rank(scorer: Any, prompts: Sequence[Any], completions: Sequence[Any], texts: Sequence[str], n: int,
         columns: dict[str, list[Any]], rows: Sequence[int], truncated: Sequence[bool],
         missing_eos_penalty: float = 0.0, bonus: Sequence[float] | None = None) -> Ranking:
    """One pair per prompt from ``n`` completions each (grouped: the first prompt's ``n``, then the next's).

    ``prompts``, ``completions`` (as the judges receive them: text, or an
    assistant message for a conversational prompt), ``texts``, ``columns``
    (the data's other columns), ``rows`` (data rows, for the judges' error
    messages) and ``truncated`` (no EOS within ``max_new_tokens``) have one
    entry per completion. A truncated completion loses ``missing_eos_penalty``
    from its score, or from its wins with a pairwise judge. ``bonus`` (one
    per completion: an episode's environment reward) is added to the
    pointwise judges' scores.
    """
    groups = range(0, len(texts), n)
    pairwise = [spec for spec in scorer.specs if spec.judge.kind == "pairwise"]
    if pairwise:
        scores = pairwise_scores(scorer, pairwise[0], prompts, completions, texts, n, columns, rows)
    else:
        scores, _ = scorer(prompts, completions, columns, rows)
        if bonus is not None:
            scores = [score + extra for score, extra in zip(scores, bonus)]
    scores = [score - missing_eos_penalty * cut for score, cut in zip(scores, truncated)]
    pairs = [best_against_worst(scores[start : start + n], texts[start : start + n]) for start in groups]
    return Ranking(pairs, None, scores) if pairwise else Ranking(pairs, scores)


def pairwise_scores(scorer: Any, spec: Any, prompts: Sequence[Any], completions: Sequence[Any],
                    texts: Sequence[str], n: int, columns: dict[str, list[Any]], rows: Sequence[int]) -> list[float]:
    """Wins of each completion within its prompt's group, from one call of the pairwise judge for the batch."""
    asked: list[tuple[int, int]] = []  # positions in the batch of each compared pair
    for start in range(0, len(texts), n):
        asked += [(start + i, start + j) for i, j in comparisons(texts[start : start + n])]
    verdicts = []
    if asked:
        first = [i for i, _ in asked]
        verdicts = scorer.score(spec, [prompts[i] for i in first], [(completions[i], completions[j]) for i, j in asked],
                                {name: [values[i] for i in first] for name, values in columns.items()},
                                [rows[i] for i in first])
    return wins(len(texts), asked, verdicts)
