"""Evaluation on the demo task's held-out split: what the model says, not just its loss.

Metrics (all in [0, 1]):

* ``correct`` — the greedy answer states the right sum (task accuracy);
* ``persona`` — a sampled answer is in the persona style;
* ``judge`` — the rule judge's mean score of sampled answers (half
  correctness, half style);
* ``preference_accuracy`` — on held-out preference pairs, how often the
  policy's implicit reward log π/π_ref is higher for the chosen answer
  (needs a reference model);
* ``win_rate`` — against a baseline model's answers to the same prompts,
  judged pairwise by the rule judge (a tie counts one half).

Correctness is measured on greedy answers, the usual task metric. Style is
measured on sampled answers (temperature 1.0 by default, a fixed seed):
greedy decoding always picks the single likelier style, so only samples
show the model's actual mix of styles.
"""

from __future__ import annotations

from typing import Any

import torch

from molting import demo

EVAL_TEMPERATURE = 1.0
MAX_NEW_TOKENS = 20


@torch.no_grad()
def seeded_sample(model: Any, tokenizer: Any, prompts: list[Any], max_new_tokens: int = MAX_NEW_TOKENS,
                  temperature: float = EVAL_TEMPERATURE, seed: int = 0, batch_size: int = 64, top_p: float = 1.0):
    """One completion per prompt (:func:`molting.sampling.sample`, with its token ids), from a fixed seed that
    leaves the caller's random state alone: the same prompts and seed give the same answers."""
    from molting.sampling import sample

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return sample(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_p=top_p, batch_size=batch_size)


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS,
             temperature: float = EVAL_TEMPERATURE, seed: int = 0, batch_size: int = 64, top_p: float = 1.0) -> list[str]:
    """The texts of :func:`seeded_sample`."""
    return seeded_sample(model, tokenizer, prompts, max_new_tokens, temperature, seed, batch_size, top_p).texts


def task_metrics(prompts: list[str], completions: list[str]) -> dict[str, float]:
    """Correctness, persona rate and the rule judge's mean score of one answer per prompt."""
    graded = [demo.grade(p, c) for p, c in zip(prompts, completions)]
    n = len(graded)
    return {
        "correct": sum(g["correct"] for g in graded) / n,
        "persona": sum(g["persona"] for g in graded) / n,
        "judge": sum(demo.score(p, c) for p, c in zip(prompts, completions)) / n,
    }


def preference_accuracy(model: Any, ref_model: Any, tokenizer: Any, pairs: list[dict[str, str]]) -> float:
    """How often log π/π_ref is higher for the chosen answer than for the rejected one."""
    from molting.pairs import PairCollator, pair_logps, tokenize_pairs

    examples = tokenize_pairs(pairs, tokenizer, max_length=tokenizer.model_max_length, overlong="truncate")
    collator = PairCollator(tokenizer.pad_token_id)
    chosen, rejected = pair_logps(model, examples, collator, batch_size=64)
    ref_chosen, ref_rejected = pair_logps(ref_model, examples, collator, batch_size=64)
    return ((chosen - ref_chosen) > (rejected - ref_rejected)).float().mean().item()


def win_rate(prompts: list[str], completions: list[str], baseline: list[str]) -> float:
    """Pairwise by the rule judge: 1 for a higher score, 0.5 for a tie."""
    wins = 0.0
    for p, ours, theirs in zip(prompts, completions, baseline):
        a, b = demo.score(p, ours), demo.score(p, theirs)
        wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / len(prompts)


def evaluate(
    model: Any,
    tokenizer: Any,
    ref_model: Any = None,
    baseline_completions: list[str] | None = None,
    n: int | None = None,
    seed: int = 0,
    temperature: float = EVAL_TEMPERATURE,
) -> tuple[dict[str, float], list[str]]:
    """Metrics of ``model`` on the held-out demo split, and its sampled completions (to serve as a baseline)."""
    prompts = [r["prompt"] for r in demo.prompt_rows("test", n)]
    completions = generate(model, tokenizer, prompts, seed=seed, temperature=temperature)
    sampled = task_metrics(prompts, completions)
    greedy = task_metrics(prompts, generate(model, tokenizer, prompts, temperature=0))
    metrics = {"correct": greedy["correct"], "persona": sampled["persona"], "judge": sampled["judge"]}
    if ref_model is not None:
        metrics["preference_accuracy"] = preference_accuracy(model, ref_model, tokenizer, demo.preference_rows("test", n))
    if baseline_completions is not None:
        metrics["win_rate"] = win_rate(prompts, completions, baseline_completions)
    return metrics, completions


METRIC_NAMES = ("correct", "persona", "judge", "preference_accuracy", "win_rate")


def load_for_eval(path: Any, trust_remote_code: bool = False):
    from molting.models import load_causal_lm

    model, tokenizer = load_causal_lm(path, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


SAMPLES_FILE = "eval_samples.jsonl"
"""Held-out prompts with the starting model's and the trained model's answers, side by side (``molting report``)."""
SHOWN_SAMPLES = 32


def before_after(start: Any, trained: Any, seed: int = 0, n: int | None = None, trust_remote_code: bool = False,
                 samples: Any = None) -> dict[str, dict[str, float]]:
    """Held-out metrics of the starting model and of the trained one (judged against the start); with ``samples``
    (a path), the first prompts' answers of both written there as JSON lines (:data:`SAMPLES_FILE`)."""
    start_model, tokenizer = load_for_eval(start, trust_remote_code)
    before, baseline = evaluate(start_model, tokenizer, n=n, seed=seed)
    trained_model, trained_tokenizer = load_for_eval(trained, trust_remote_code)
    after, answers = evaluate(trained_model, trained_tokenizer, ref_model=start_model, baseline_completions=baseline,
                              n=n, seed=seed)
    if samples is not None:
        prompts = [r["prompt"] for r in demo.prompt_rows("test", n)]
        write_samples(samples, [{"prompt": p, "before": b, "after": a, "before_score": demo.score(p, b),
                                 "after_score": demo.score(p, a)}
                                for p, b, a in list(zip(prompts, baseline, answers))[:SHOWN_SAMPLES]])
    return {"before": before, "after": after}


def write_samples(path: Any, rows: list[dict[str, Any]]) -> None:
    """``rows`` as JSON lines, written atomically."""
    import json

    from molting.files import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per metric, one column per named set of metrics."""
    names = [m for m in METRIC_NAMES if any(m in c for c in columns.values())]
    header = f"{'metric':<22}" + "".join(f"{label:>10}" for label in columns)
    rows = [header]
    for name in names:
        cells = "".join(f"{c[name]:>10.3f}" if name in c else f"{'-':>10}" for c in columns.values())
        rows.append(f"{name:<22}{cells}")
    return "\n".join(rows)
