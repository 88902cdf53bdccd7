"""`molting eval` on anyone's model and data: intervals, win rates in both orders, length control, KL."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from molting import Judge
from molting.compare import (Contender, compare, length_controlled_win_rate, mean_interval, pairwise_outcomes,
                             sequence_kl)
from molting.judging import JudgeSpec, Scorer

from conftest import run_molting


def test_the_interval_brackets_the_mean_and_is_reproducible():
    rng = random.Random(1)
    values = [rng.random() for _ in range(200)]
    first, second = mean_interval(values), mean_interval(values)
    assert first == second and first.low < first.mean < first.high and first.n == 200
    assert first.high - first.low < 0.2
    assert mean_interval([1.0] * 10).low == mean_interval([1.0] * 10).high == 1.0


def test_length_control_removes_a_win_rate_bought_by_length():
    rng = random.Random(0)
    theirs = [rng.randint(20, 60) for _ in range(1000)]
    ours = [t + round(rng.gauss(10, 15)) for t in theirs]  # mostly longer
    # a judge that likes length and nothing else: P(win) = σ(3·tanh(Δ/15)), one half at equal lengths
    bought = [1.0 if rng.random() < 1 / (1 + math.exp(-3 * math.tanh((a - b) / 15))) else 0.0
              for a, b in zip(ours, theirs)]
    assert sum(bought) / len(bought) > 0.65
    assert abs(length_controlled_win_rate(bought, ours, theirs) - 0.5) < 0.1
    earned = [1.0 if rng.random() < 0.7 else 0.0 for _ in theirs]  # wins that have nothing to do with length
    raw = sum(earned) / len(earned)
    assert abs(length_controlled_win_rate(earned, ours, theirs) - raw) < 0.05
    assert length_controlled_win_rate([0.5] * 10, [3] * 10, [3] * 10) == pytest.approx(0.5)


def pairwise_judge(name, verdict):
    calls = []

    def score(prompts, completions, params):
        calls.append(len(completions))
        return [verdict(a, b) for a, b in completions]

    judge = Judge(name=name, score=score, kind="pairwise", description="test judge")
    return Scorer([JudgeSpec(name, judge, 1.0, None)], pairwise=True), calls


def test_a_pairwise_win_needs_both_orders_and_identical_answers_tie_unasked():
    prompts, ours, theirs = ["p1", "p2", "p3"], ["long answer", "same", "x"], ["short", "same", "longer one"]
    biased, calls = pairwise_judge("first", lambda a, b: 0)  # always the first shown: position bias only
    assert pairwise_outcomes(biased, biased.specs[0], prompts, ours, theirs, {}, [0, 1, 2]) == [0.5, 0.5, 0.5]
    assert calls == [2, 2]  # both orders, and the identical pair not at all
    longer, _ = pairwise_judge("longer", lambda a, b: 0 if len(a) > len(b) else 1)
    assert pairwise_outcomes(longer, longer.specs[0], prompts, ours, theirs, {}, [0, 1, 2]) == [1.0, 0.5, 0.0]


@pytest.fixture(scope="module")
def models(demo_model, tmp_path_factory):
    """The demo model, and a copy with its output layer's weights nudged: a different model of the same vocabulary."""
    from molting.evaluation import load_for_eval

    base, tokenizer = load_for_eval(demo_model)
    other, _ = load_for_eval(demo_model)
    with torch.no_grad():
        torch.manual_seed(0)
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("nudged")
    other.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Contender("demo", base, tokenizer), Contender("nudged", other, tokenizer), path


def test_the_kl_to_itself_is_zero_and_matches_full_logits(models):
    from molting.evaluation import seeded_sample

    base, other, _ = models
    prompts = [f"Q: What is {a} + 7?\nA:" for a in range(6)]
    samples = seeded_sample(other.model, other.tokenizer, prompts, max_new_tokens=8, temperature=0.7)
    assert sequence_kl(other.model, other.model, samples, 0.7) == [0.0] * 6
    fast = sequence_kl(other.model, base.model, samples, 0.7, batch_size=4)
    ids = torch.cat([samples.prompt_ids, samples.completion_ids], dim=1)
    mask = torch.cat([samples.prompt_mask, samples.completion_mask], dim=1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    width = samples.completion_ids.size(1)
    slow = 0
    with torch.no_grad():
        for model, sign in ((other.model, 1), (base.model, -1)):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -width - 1 : -1]
            logps = (logits / 0.7).log_softmax(-1).gather(2, samples.completion_ids[..., None])[..., 0]
            slow = slow + sign * (logps * samples.completion_mask).sum(1)
    assert fast == pytest.approx(slow.tolist(), abs=1e-4)


def test_compare_reports_every_figure(models):
    base, other, _ = models
    rows = [{"prompt": f"Q: What is {a} + {a + 3}?\nA:", "answer": str(2 * a + 3), "chosen": f" The answer is {2 * a + 3}.",
             "rejected": f" The answer is {2 * a + 5}."} for a in range(12)]
    scorer, calls = pairwise_judge("longer", lambda a, b: 0 if len(a) > len(b) else 1)
    report = compare(other, base, rows, scorer, max_new_tokens=12, shown=2, source="rows")
    win = report["win_rate"]
    assert win["wins"] + win["ties"] + win["losses"] == 12 and win["low"] <= win["mean"] <= win["high"]
    assert 0 <= report["length_controlled_win_rate"] <= 1
    assert set(report["length"]) == {"model", "baseline"} and report["kl"]["n"] == 12
    assert report["preference_accuracy"]["n"] == 12 and report["preference_accuracy"]["reference"] == "demo"
    assert [s["prompt"] for s in report["samples"]] == [rows[0]["prompt"], rows[1]["prompt"]]
    assert json.loads(json.dumps(report)) == report


def test_molting_eval_on_users_data(models, tmp_path):
    _, _, nudged = models
    data = tmp_path / "heldout.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Q: What is {a} + 5?\nA:", "answer": str(a + 5)})
                              for a in range(10)))
    from molting.demo import demo_model_dir

    args = ["eval", "--model", str(nudged), "--baseline", str(demo_model_dir()), "--data", str(data), "--judge",
            "rule", "--judge-arg", "rule.column=answer", "--max-new-tokens", "12"]
    result = run_molting(*args, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["prompts"] == 10 and set(report["judges"]["rule"]) == {"model", "baseline"}
    assert report["win_rate_judge"] == "rule (pointwise scores)" and "preference_accuracy" not in report
    assert "demo" not in report  # the demo's task figures only on the demo
    table = run_molting(*args, "--show", "1")
    assert table.returncode == 0, table.stderr[-2000:]
    assert "judge rule" in table.stdout and "win rate" in table.stdout and "[1] Q: What is 0 + 5? A:" in table.stdout
    assert "[2]" not in table.stdout


def test_molting_eval_names_a_missing_prompt_column(models, tmp_path):
    _, _, nudged = models
    data = tmp_path / "questions.jsonl"
    data.write_text(json.dumps({"question": "hi"}) + "\n")
    result = run_molting("eval", "--model", str(nudged), "--data", str(data))
    assert result.returncode == 1 and "questions.jsonl" in result.stderr and "prompt" in result.stderr
