"""Ranking sampled completions into pairs (molting.ranking): what sample-pairs and online DPO share."""

from __future__ import annotations

from molting.components import Judge
from molting.judging import JudgeSpec, Scorer
from molting.ranking import Pair, best_against_worst, rank


def test_pointwise_ranking_is_best_against_worst_with_trls_tie_rule():
    assert best_against_worst([0.5, 1.0, 0.0, 1.0], ["a", "b", "c", "d"]) == Pair(1, 2, tie=False)
    assert best_against_worst([0.0, 1.0], ["a", "b"]) == Pair(1, 0, tie=False)
    # equal scores: the first is chosen, as trl's `first >= second`; a tie all the same
    assert best_against_worst([0.5, 0.5], ["a", "b"]) == Pair(0, 1, tie=True)
    assert best_against_worst([0.3, 0.3, 0.3], ["a", "b", "c"]) == Pair(0, 2, tie=True)
    assert best_against_worst([1.0, 0.0], ["same", "same"]).tie  # nothing to tell apart


def _judge(name: str, score, kind: str = "pointwise") -> JudgeSpec:
    judge = Judge(name=name, score=score, description=f"{name} (test)", kind=kind)
    return JudgeSpec(name, judge, 1.0, judge.params())


def test_pointwise_judges_are_summed_by_weight_and_a_missing_eos_costs_the_penalty():
    longer = _judge("longer", lambda prompts, completions, params: [float(len(c)) for c in completions])
    answer = _judge("answer", lambda prompts, completions, params, **columns: [
        float(c == a) for c, a in zip(completions, columns["answer"])])  # a judge reads the data's columns
    scorer = Scorer([longer, JudgeSpec("answer", answer.judge, 10.0, answer.params)])
    texts = ["42", "4242", "7", "77"]
    args = (["p", "p", "q", "q"], texts, texts, 2, {"answer": ["42", "42", "1", "1"]}, [0, 0, 1, 1])
    ranking = rank(scorer, *args, truncated=[False] * 4)
    assert ranking.pairs == [Pair(0, 1, tie=False), Pair(1, 0, tie=False)]
    assert ranking.scores == [12.0, 4.0, 1.0, 2.0]  # 10 x the answer judge + the length
    penalised = rank(scorer, *args, truncated=[True, False, False, True], missing_eos_penalty=20.0)
    assert penalised.pairs == [Pair(1, 0, tie=False), Pair(0, 1, tie=False)]
    assert penalised.scores == [-8.0, 4.0, 1.0, -18.0]


def test_a_pairwise_judge_decides_each_pair_once_and_undecided_is_a_tie():
    calls = []

    def prefer_longer(prompts, pairs, params):
        calls.append(list(pairs))
        return [-1 if len(a) == len(b) else int(len(b) > len(a)) for a, b in pairs]

    scorer = Scorer([_judge("longer", prefer_longer, kind="pairwise")], pairwise=True)
    texts = ["a", "bbb", "cc", "d", "xx", "yy", "same", "same"]
    ranking = rank(scorer, [f"p{i // 2}" for i in range(8)], texts, texts, 2, {}, [i // 2 for i in range(8)],
                   truncated=[False] * 8)
    assert ranking.pairs == [Pair(1, 0, tie=False), Pair(0, 1, tie=False), Pair(0, 1, tie=True), Pair(0, 1, tie=True)]
    assert ranking.scores is None  # verdicts, not scores
    assert calls == [[("a", "bbb"), ("cc", "d"), ("xx", "yy")]]  # one call; identical answers are not compared
    # more samples: every two compared, the most wins chosen and the fewest rejected (undecided: half a win each)
    texts = ["a", "bbb", "cc", "dd"]
    ranking = rank(scorer, ["p"] * 4, texts, texts, 4, {}, [0] * 4, truncated=[False] * 4)
    assert ranking.pairs == [Pair(1, 0, tie=False)] and len(calls[-1]) == 6
