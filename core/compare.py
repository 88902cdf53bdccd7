"""A model against a baseline on anyone's prompts: the figures ``molting eval`` reports.

:func:`compare` samples one answer per prompt from the model (and from the
baseline, with the same seed) and reports

* ``judges`` — each judge's mean score of the model's answers (and the
  baseline's), with a 95% bootstrap confidence interval;
* ``win_rate`` — how often the model's answer beats the baseline's: through
  a pairwise judge asked in both orders (a win only when both orders agree,
  a tie counting one half otherwise), else by the pointwise judges' weighted
  scores; ``length_controlled_win_rate`` is the same win rate with the
  length difference regressed out (AlpacaEval 2's length-controlled win
  rate: a logistic model of the outcome on ``tanh(Δlength / sd)``, read at
  zero difference);
* ``length`` — mean completion length in tokens, of both models;
* ``kl`` — a Monte-Carlo estimate of KL(model ‖ baseline) per answer: the
  summed log-ratio of the model's own sampled tokens (both models must share
  a vocabulary; sampled at temperature > 0);
* ``preference_accuracy`` — when the data has ``chosen``/``rejected``, how
  often the model's implicit reward log π/π_ref ranks the chosen answer
  higher (π_ref: ``--ref-model``, else the baseline);
* ``samples`` — prompts with both answers and the verdict, for people to read.

Every figure comes with its count, so a reader knows how much to trust it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import attrs
import torch

CONFIDENCE = 0.95
RESAMPLES = 2000


@attrs.frozen
class Interval:
    """A mean with its bootstrap confidence interval over ``n`` values."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                  seed: int = 0) -> Interval:
    """The mean of ``values`` and its percentile-bootstrap interval (a fixed seed: the same values, the same interval)."""
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    means = np.random.default_rng(seed).choice(data, size=(resamples, data.size)).mean(axis=1)
    tail = (1 - confidence) / 2
    return Interval(float(data.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)), int(data.size))


def pairwise_outcomes(scorer: Any, spec: Any, prompts: Sequence[Any], ours: Sequence[str], theirs: Sequence[str],
                      columns: dict[str, list[Any]], rows: Sequence[int]) -> list[float]:
    """1 where the pairwise judge prefers ``ours`` in both orders, 0 where ``theirs`` in both, else 0.5 (a tie).

    Identical answers tie without asking the judge.
    """
    asked = [i for i in range(len(prompts)) if ours[i] != theirs[i]]
    outcomes = [0.5] * len(prompts)
    if not asked:
        return outcomes
    pick = {name: [values[i] for i in asked] for name, values in columns.items()}
    first = [prompts[i] for i in asked]
    forward = scorer.score(spec, first, [(ours[i], theirs[i]) for i in asked], pick, [rows[i] for i in asked])
    backward = scorer.score(spec, first, [(theirs[i], ours[i]) for i in asked], pick, [rows[i] for i in asked])
    for i, f, b in zip(asked, forward, backward):
        outcomes[i] = 1.0 if (f, b) == (0, 1) else 0.0 if (f, b) == (1, 0) else 0.5
    return outcomes


def pointwise_outcomes(ours: Sequence[float], theirs: Sequence[float]) -> list[float]:
    """1 for a higher score, 0 for a lower one, 0.5 for a tie."""
    return [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(ours, theirs)]


def length_controlled_win_rate(outcomes: Sequence[float], ours: Sequence[int], theirs: Sequence[int],
                               iterations: int = 50, ridge: float = 1e-3) -> float:
    """The win rate a logistic model of the outcome predicts at equal lengths (AlpacaEval 2's length control).

    ``P(win) = σ(θ₀ + θ₁·tanh((len_ours − len_theirs) / sd))``, fitted by
    Newton's method on the outcomes as soft labels (a tie is half a win),
    with a small ridge on θ₁ so a perfectly separating length does not
    diverge; the length-controlled win rate is ``σ(θ₀)``.
    """
    import numpy as np

    y = np.asarray(outcomes, dtype=np.float64)
    diff = np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)
    spread = diff.std()
    x = np.tanh(diff / spread) if spread > 0 else np.zeros_like(diff)
    features = np.stack([np.ones_like(x), x], axis=1)
    theta = np.zeros(2)
    penalty = np.diag([0.0, ridge * len(y)])
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-features @ theta))
        gradient = features.T @ (y - p) - penalty @ theta
        hessian = features.T @ (features * (p * (1 - p) + 1e-9)[:, None]) + penalty
        step = np.linalg.solve(hessian, gradient)
        theta += step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-theta[0])))


@torch.no_grad()
def sequence_kl(model: Any, baseline: Any, samples: Any, temperature: float, batch_size: int = 16) -> list[float]:
    """Per answer, ``Σ_t log π(y_t|…) − log π_baseline(y_t|…)`` over the model's own sampled tokens (of an episode:
    its turns, not what the environment wrote).

    Its mean is an unbiased estimate of KL(π ‖ π_baseline) per answer, both
    distributions taken at the sampling temperature. ``baseline`` is a model,
    or a function that runs a function of a model under the baseline (a
    stage's reference: the policy with its LoRA adapter disabled).
    """
    from molting.logps import completion_token_logps

    under = (lambda compute: compute(baseline)) if isinstance(baseline, torch.nn.Module) else baseline
    values = []
    for start in range(0, samples.completion_ids.size(0), batch_size):
        part = slice(start, start + batch_size)
        args = (samples.prompt_ids[part], samples.prompt_mask[part], samples.completion_ids[part],
                samples.completion_mask[part])

        def logps(network: Any) -> torch.Tensor:
            was_training = network.training
            device = next(network.parameters()).device
            out = completion_token_logps(network.eval(), *(a.to(device) for a in args), temperature=temperature)[0]
            network.train(was_training)
            return out.float().cpu()

        own = samples.loss_mask[part].float().cpu()  # an episode's environment tokens are not the model's to weigh
        values += ((logps(model) - under(logps)) * own).sum(dim=1).tolist()
    return values


def same_vocabulary(tokenizer: Any, other: Any) -> bool:
    """Whether two tokenizers map the same strings to the same ids (a KL between their models is defined)."""
    return tokenizer is other or tokenizer.get_vocab() == other.get_vocab()


def preference_accuracy(model: Any, reference: Any, tokenizer: Any, pair_rows: Any, source: str,
                        max_length: int) -> Interval:
    """How often ``log π/π_ref`` is higher for the chosen answer than for the rejected one, over ``pair_rows``."""
    from molting.pairs import PairCollator, format_pairs, pair_logps, tokenize_pairs
    from molting.sampling import pad_token_id

    pairs = format_pairs(pair_rows, tokenizer, source, stage="eval")
    examples = tokenize_pairs(pairs, tokenizer, max_length=max_length, overlong="truncate", source=source)
    collator = PairCollator(pad_token_id(tokenizer))
    chosen, rejected = pair_logps(model, examples, collator, batch_size=16)
    ref_chosen, ref_rejected = pair_logps(reference, examples, collator, batch_size=16)
    return mean_interval(((chosen - ref_chosen) > (rejected - ref_rejected)).float().tolist())


@attrs.frozen
class Contender:
    """A model under evaluation: its label in reports, the network and its tokenizer."""

    name: str
    model: Any
    tokenizer: Any


def compare(model: Contender, baseline: Contender | None, rows: Sequence[dict[str, Any]], scorer: Any = None, *,
            reference: Contender | None = None, pair_rows: Sequence[dict[str, Any]] | None = None, max_new_tokens: int = 128, temperature: float = 1.0, seed: int = 0,
            max_length: int = 1024, shown: int = 3, source: str = "data") -> dict[str, Any]:
    """Every figure of the module docstring for ``model`` (against ``baseline``) on the prompts of ``rows``.

    ``scorer`` is a :class:`molting.judging.Scorer` of the run's judges (it
    may hold one pairwise judge); ``reference`` is π_ref of the preference
    accuracy (default: the baseline), measured on ``pair_rows`` (default:
    ``rows``, when they have ``chosen`` and ``rejected``). A JSON-ready dict, read by
    :func:`format_comparison`.
    """
    from molting.judging import data_columns
    from molting.evaluation import seeded_sample

    prompts = [row["prompt"] for row in rows]
    columns, indices = data_columns(rows), list(range(len(rows)))
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    ours = seeded_sample(model.model, model.tokenizer, prompts, **settings)
    theirs = seeded_sample(baseline.model, baseline.tokenizer, prompts, **settings) if baseline else None
    report: dict[str, Any] = {"model": model.name, "baseline": baseline.name if baseline else None,
                              "prompts": len(prompts), "source": source, **settings}
    report["length"] = {"model": attrs.asdict(mean_interval(ours.lengths.tolist()))}
    if theirs is not None:
        report["length"]["baseline"] = attrs.asdict(mean_interval(theirs.lengths.tolist()))
    outcomes = _judged(report, scorer, prompts, ours.texts, theirs.texts if theirs else None, columns, indices)
    if outcomes is not None:
        _win_rate(report, outcomes, ours.lengths.tolist(), theirs.lengths.tolist())
    if baseline is not None:
        report["kl"], report["kl_note"] = _kl(model, baseline, ours, temperature)
    reference = reference or baseline
    if pair_rows is None and rows and {"chosen", "rejected"} <= set(rows[0]):
        pair_rows = rows
    if reference is not None and pair_rows:
        accuracy = preference_accuracy(model.model, reference.model, model.tokenizer, list(pair_rows), source, max_length)
        report["preference_accuracy"] = {**attrs.asdict(accuracy), "reference": reference.name}
    report["samples"] = [
        {"prompt": prompts[i], "model": ours.texts[i], "baseline": theirs.texts[i] if theirs else None,
         "outcome": outcomes[i] if outcomes is not None else None}
        for i in range(min(shown, len(prompts)))
    ]
    return report


def _judged(report: dict[str, Any], scorer: Any, prompts: list[Any], ours: list[str], theirs: list[str] | None,
            columns: dict[str, list[Any]], rows: list[int]) -> list[float] | None:
    """Fill ``report["judges"]`` with each pointwise judge's intervals; the per-prompt outcomes against the baseline."""
    if scorer is None:
        return None
    pointwise = [spec for spec in scorer.specs if spec.judge.kind == "pointwise"]
    pairwise = [spec for spec in scorer.specs if spec.judge.kind == "pairwise"]
    report["judges"] = {}
    totals: dict[str, list[float]] = {"model": [0.0] * len(prompts), "baseline": [0.0] * len(prompts)}
    for spec in pointwise:
        entry = {}
        for side, texts in (("model", ours), ("baseline", theirs)):
            if texts is not None:
                scores = scorer.score(spec, prompts, texts, columns, rows)
                entry[side] = attrs.asdict(mean_interval(scores))
                totals[side] = [t + spec.weight * s for t, s in zip(totals[side], scores)]
        report["judges"][spec.name] = entry
    if theirs is None:
        return None
    if pairwise:
        report["win_rate_judge"] = f"{pairwise[0].name} (pairwise, both orders)"
        return pairwise_outcomes(scorer, pairwise[0], prompts, ours, theirs, columns, rows)
    if not pointwise:
        return None
    report["win_rate_judge"] = " + ".join(spec.name for spec in pointwise) + " (pointwise scores)"
    return pointwise_outcomes(totals["model"], totals["baseline"])


def _win_rate(report: dict[str, Any], outcomes: list[float], ours: list[int], theirs: list[int]) -> None:
    report["win_rate"] = {**attrs.asdict(mean_interval(outcomes)), "wins": outcomes.count(1.0),
                          "ties": outcomes.count(0.5), "losses": outcomes.count(0.0)}
    report["length_controlled_win_rate"] = length_controlled_win_rate(outcomes, ours, theirs)


def _kl(model: Contender, baseline: Contender, samples: Any, temperature: float) -> tuple[dict | None, str | None]:
    if temperature <= 0:
        return None, "not estimated: greedy answers have no sampling distribution (use --temperature > 0)"
    if not same_vocabulary(model.tokenizer, baseline.tokenizer):
        return None, "not estimated: the two models' tokenizers have different vocabularies"
    values = sequence_kl(model.model, baseline.model, samples, temperature)
    return attrs.asdict(mean_interval(values)), None


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    return f"{entry['mean']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def format_comparison(report: dict[str, Any], width: int = 100) -> str:
    """``compare``'s figures as a plain-text table, then the sampled answers."""
    import textwrap

    against = f" vs {report['baseline']}" if report["baseline"] else ""
    lines = [f"{report['model']}{against} on {report['prompts']} prompts of {report['source']} "
             f"(seed {report['seed']}, temperature {report['temperature']}, at most {report['max_new_tokens']} new tokens)",
             "", f"{'':<28}{'model':<28}{'baseline' if report['baseline'] else ''}"]

    def row(label: str, entry: dict[str, Any] | None) -> None:
        entry = entry or {}
        lines.append(f"{label:<28}{_cell(entry.get('model')):<28}{_cell(entry.get('baseline')) if 'baseline' in entry else ''}")

    for name, entry in report.get("judges", {}).items():
        row(f"judge {name}", entry)
    row("length (tokens)", report["length"])
    if "win_rate" in report:
        w = report["win_rate"]
        lines += ["", f"{'win rate':<28}{_cell(w):<28}{w['wins']} wins, {w['ties']} ties, {w['losses']} losses "
                      f"({report['win_rate_judge']})",
                  f"{'length-controlled':<28}{report['length_controlled_win_rate']:.3f}"]
    if "kl" in report:
        lines.append(f"{'KL(model ‖ baseline)':<28}" + (f"{_cell(report['kl']):<28}nats per answer" if report["kl"]
                                                         else report["kl_note"]))
    if "preference_accuracy" in report:
        p = report["preference_accuracy"]
        lines.append(f"{'preference accuracy':<28}{_cell(p):<28}{p['n']} pairs, π_ref {p['reference']}")
    for i, sample in enumerate(report["samples"], 1):
        outcome = {1.0: "model wins", 0.0: "baseline wins", 0.5: "tie", None: ""}[sample["outcome"]]
        lines += ["", f"[{i}] {_text(sample['prompt'])}" + (f"   → {outcome}" if outcome else "")]
        for side in ("model", "baseline"):
            if sample[side] is not None:
                lines += textwrap.wrap(_text(sample[side]) or "(empty)", width, initial_indent=f"    {side:<9} ",
                                       subsequent_indent=" " * 14)
    return "\n".join(lines)


def _text(value: Any) -> str:
    from molting.judging import text_of

    return " ".join(text_of(value).split())
