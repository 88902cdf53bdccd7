"""The ``sample-pairs`` stage: on-policy preference pairs, sampled from a model and ranked by a judge.

For each prompt it samples ``num_samples`` completions from the run's model
(the policy so far: the SFT model in ``--plugin sft --plugin sample-pairs
--plugin dpo``), scores them with the run's judges, and writes the best as
``chosen`` and the worst as ``rejected`` to ``OUTPUT/data.jsonl``: the next
step's data. A prompt whose completions all score the same is skipped (a
tie teaches nothing), and so is one whose best and worst answers are the
same text. With a pairwise judge (``llm-pairwise``) every two distinct
completions are compared; the one with the most wins is chosen, the one
with the fewest rejected (an undecided comparison is half a win each).

The stage trains nothing; its output directory holds the data, the counts
(in ``molting_run.json``) and no model, so the next step starts from the
same model as this one.
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any

import attrs

import molting
from molting.components import Stage

METRICS = ("pairs", "skipped_ties", "score/chosen", "score/rejected", "score/margin", "completions/mean_length")


@attrs.frozen
class SamplePairsParams:
    """How many completions per prompt, and how they are sampled."""

    num_samples: int = attrs.field(default=4, validator=attrs.validators.ge(2))
    max_new_tokens: int = attrs.field(default=64, validator=attrs.validators.gt(0))
    temperature: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    top_p: float = attrs.field(default=1.0, validator=[attrs.validators.gt(0), attrs.validators.le(1)])
    generation_batch_size: int = attrs.field(default=64, validator=attrs.validators.gt(0))


@molting.hookimpl
def molting_register_stages(register):
    register(
        Stage(
            name="sample-pairs",
            run=run_sample_pairs,
            description="On-policy pairs: sample N answers per prompt, rank them with a judge, write best vs worst.",
            columns=("prompt",),
            default_data="demo-prompts",
            metrics=METRICS,
            params=SamplePairsParams,
            produces="dataset",
            default_judges={"demo-rule": 1.0},
            demo_defaults={"max_new_tokens": 20},
        )
    )


def best_and_worst(scores: list[float]) -> tuple[int, int] | None:
    """Indices of the highest and the lowest score (first of equals), or ``None`` when all are equal."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    return None if scores[best] == scores[worst] else (best, worst)


def pairwise_wins(scorer, spec, prompt: Any, texts: list[str], row: int) -> list[float]:
    """Wins of each completion over the others by a pairwise judge (undecided: half a win each)."""
    pairs = [(i, j) for i, j in itertools.combinations(range(len(texts)), 2) if texts[i] != texts[j]]
    wins = [0.0] * len(texts)
    if not pairs:
        return wins
    verdicts = scorer.score(spec, [prompt] * len(pairs), [(texts[i], texts[j]) for i, j in pairs], rows=[row] * len(pairs))
    for (i, j), verdict in zip(pairs, verdicts):
        if verdict == -1:
            wins[i] += 0.5
            wins[j] += 0.5
        else:
            wins[(i, j)[verdict]] += 1
    return wins


def run_sample_pairs(context) -> dict[str, Any]:
    import torch

    from molting.data import check_columns, check_text_fields
    from molting.judging import Scorer, data_columns, resolve_judges
    from molting.models import load_causal_lm
    from molting.files import write_text_atomic
    from molting.sampling import sample
    from molting.training import log_metrics

    config, params = context.config, context.stage_params
    rows = context.rows
    check_columns(rows, [("prompt",)], context.data_source, "sample-pairs")
    conversational = check_text_fields(rows, ("prompt",), context.data_source)
    if not config.judges and not context.data.demo:
        from molting.errors import ConfigError

        raise ConfigError(
            f"sample-pairs ranks answers with a judge, and its default (demo-rule) grades only the demo task; "
            f"for {context.data_source} name one: --judge rule, --judge reward-model, --judge python, --judge llm-pairwise"
        )
    specs = resolve_judges(context.host, config, context.stage.default_judges, context.artifacts, "stage 'sample-pairs'")
    pairwise = [s for s in specs if s.judge.kind == "pairwise"]
    if pairwise and len(specs) > 1:
        from molting.errors import ConfigError

        raise ConfigError("a pairwise judge ranks completions alone: give it without other judges")
    scorer = Scorer(specs, pairwise=bool(pairwise))
    torch.manual_seed(config.seed)
    model, tokenizer = load_causal_lm(context.model_path, trust_remote_code=config.trust_remote_code)
    if torch.cuda.is_available():
        model = model.cuda()
    print(
        f"molting: sampling {params.num_samples} completions for each of {len(rows)} prompts from {context.model_path}, "
        f"judged by {', '.join(s.name for s in specs)}",
        file=sys.stderr,
    )
    written, ties, chosen_scores, rejected_scores, lengths = [], 0, [], [], []
    from tqdm.auto import tqdm

    step = max(1, params.generation_batch_size // params.num_samples)
    for start in tqdm(range(0, len(rows), step), desc="sample-pairs"):
        chunk = list(range(start, min(start + step, len(rows))))
        samples = sample(model, tokenizer, [rows[i]["prompt"] for i in chunk], n=params.num_samples,
                         max_new_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                         batch_size=params.generation_batch_size)
        lengths += samples.lengths.tolist()
        if not pairwise:
            sampled_rows = [chunk[r] for r in samples.rows]
            totals, _ = scorer(samples.prompts, samples.texts, data_columns([rows[i] for i in sampled_rows]),
                               rows=sampled_rows)
        for position, index in enumerate(chunk):
            texts = samples.texts[position * params.num_samples : (position + 1) * params.num_samples]
            if pairwise:
                scores = pairwise_wins(scorer, pairwise[0], rows[index]["prompt"], texts, index)
            else:
                scores = totals[position * params.num_samples : (position + 1) * params.num_samples]
            picked = best_and_worst(scores)
            if picked is None or texts[picked[0]] == texts[picked[1]]:
                ties += 1
                continue
            best, worst = picked
            chosen, rejected = texts[best], texts[worst]
            if conversational:
                chosen = [{"role": "assistant", "content": chosen.strip()}]
                rejected = [{"role": "assistant", "content": rejected.strip()}]
            written.append({"prompt": rows[index]["prompt"], "chosen": chosen, "rejected": rejected,
                            "score_chosen": scores[best], "score_rejected": scores[worst]})
            chosen_scores.append(scores[best])
            rejected_scores.append(scores[worst])
    path = context.output_dir / "data.jsonl"
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in written))
    mean = lambda values: sum(values) / len(values) if values else 0.0  # noqa: E731
    metrics = {
        "pairs": len(written),
        "skipped_ties": ties,
        "score/chosen": mean(chosen_scores),
        "score/rejected": mean(rejected_scores),
        "score/margin": mean(chosen_scores) - mean(rejected_scores),
        "completions/mean_length": mean(lengths),
        "judge_cache_hits": scorer.hits,
    }
    log_metrics(context.output_dir / "metrics.jsonl", 0, metrics, context.host.hook)
    print(
        f"molting: wrote {len(written)} pairs to {path} ({ties} of {len(rows)} prompts skipped: all answers scored "
        f"the same); mean score chosen {metrics['score/chosen']:.3f}, rejected {metrics['score/rejected']:.3f}",
        file=sys.stderr,
    )
    if not written:
        from molting.errors import DataError

        raise DataError(
            f"sample-pairs wrote no pairs: for every prompt of {context.data_source} all {params.num_samples} answers "
            "scored the same. Sample more answers (--set num_samples=8), raise the temperature, or use a finer judge."
        )
    return metrics
