"""The ``sample-pairs`` stage: on-policy preference pairs, sampled from a model and ranked by a judge.

For each prompt it samples ``num_samples`` completions from the run's model
(the policy so far: the SFT model in ``--plugin sft --plugin sample-pairs
--plugin dpo``), scores them with the run's judges, and writes the best as
``chosen`` and the worst as ``rejected`` to ``OUTPUT/data.jsonl``: the next
step's data (:mod:`molting.ranking`). A prompt whose completions all score
the same is skipped (a tie teaches nothing), and so is one whose best and
worst answers are the same text. With a pairwise judge (``llm-pairwise``)
every two distinct completions are compared; the one with the most wins is
chosen, the one with the fewest rejected (an undecided comparison is half a
win each).

With ``--env NAME`` each sample is a whole multi-turn episode of the
environment (the same ``num_samples`` per prompt, each from the episode's
start), scored by the environment's reward (times ``env_weight``) plus any
pointwise judges': ``chosen`` and ``rejected`` are then the two episodes'
messages after the prompt (assistant turns with their tool calls, tool
results), with the episode's ``tools`` alongside, as trl's conversational
preference data holds them.

The stage trains nothing; its output directory holds the data, the counts
(in ``molting_run.json``) and no model, so the next step starts from the
same model as this one.
"""

from __future__ import annotations

import sys
from typing import Any

import attrs

import molting
from molting.context import StageContext
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
            environments=True,
        )
    )


def run_sample_pairs(context: StageContext) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    from molting.data import check_prompts, iter_rows
    from molting.environments import episode_runner
    from molting.files import write_jsonl_atomic
    from molting.models import load_causal_lm
    from molting.sampling import sampler_for
    from molting.training import LoopEvents

    config, params, rows = context.config, context.stage_params, list(iter_rows(context.rows))
    conversational = check_prompts(rows, context.data_source, "sample-pairs")
    scorer = _scorer(context)
    draw = sampler_for(context.host, config.sampler, config.sampler_args, "sample-pairs", trains=False)
    torch.manual_seed(config.seed)
    model, tokenizer = load_causal_lm(context.model_path, trust_remote_code=config.trust_remote_code)
    if torch.cuda.is_available():
        model = model.cuda()
    episodes = episode_runner(context, tokenizer, params.max_new_tokens, params.temperature, params.top_p,
                              batch_size=params.generation_batch_size)
    judged = scorer.names + ([f"environment {episodes.environment.name}"] if episodes else [])
    what = f"episodes of {episodes.environment.name}" if episodes else "completions"
    print(f"molting: sampling {params.num_samples} {what} for each of {len(rows)} prompts from "
          f"{context.model_path} (sampler {config.sampler}), judged by {', '.join(judged)}", file=sys.stderr)
    per_batch = max(1, params.generation_batch_size // params.num_samples)
    starts = range(0, len(rows), per_batch)
    ranked = _Ranked(conversational or episodes is not None)
    events = LoopEvents(context, max_steps=len(starts), model=model, tokenizer=tokenizer)
    events.train_begin()
    for start in tqdm(starts, desc="sample-pairs"):
        events.step_begin()
        _sample_and_rank(draw, model, tokenizer, scorer, rows, range(start, min(start + per_batch, len(rows))), params,
                         ranked, episodes, config.seed)
        events.step_end()
    path = context.output_dir / "data.jsonl"
    write_jsonl_atomic(path, ranked.written)
    metrics = {**ranked.metrics(), "judge_cache_hits": scorer.hits, **scorer.metrics()}
    events.log(metrics)
    events.train_end()
    print(f"molting: wrote {len(ranked.written)} pairs to {path} ({ranked.ties} of {len(rows)} prompts skipped: all "
          f"answers scored the same); mean score chosen {metrics['score/chosen']:.3f}, rejected "
          f"{metrics['score/rejected']:.3f}", file=sys.stderr)
    failed = sum(scorer.failed.values())
    if failed:
        done = {"skip": "left out", "zero": "scored 0"}[config.judge_on_error]
        first = "; ".join(f"{name}: {reason}" for name, reason in scorer.first_failure.items())
        print(f"molting: {failed} judgements could not be made and were {done} (judge_on_error: "
              f"{config.judge_on_error}); the first: {first}", file=sys.stderr)
    if not ranked.written:
        from molting.errors import DataError

        if failed:
            raise DataError(f"sample-pairs wrote no pairs: {failed} judgements could not be made (judge_on_error: "
                            f"{config.judge_on_error}); the first failure is printed above")
        raise DataError(
            f"sample-pairs wrote no pairs: for every prompt of {context.data_source} all {params.num_samples} answers "
            "scored the same. Sample more answers (--set num_samples=8), raise the temperature, or use a finer judge."
        )
    return metrics


def _scorer(context: StageContext) -> Any:
    """The run's judges: pointwise ones summed by weight, or one pairwise judge alone."""
    from molting.errors import ConfigError
    from molting.judging import Scorer, resolve_judges

    if context.environment is not None:  # the environment's reward ranks episodes, with any judges named beside it
        specs = resolve_judges(context.host, context.config, {}, context.artifacts, "stage 'sample-pairs'",
                               required=False)
        if any(spec.judge.kind == "pairwise" for spec in specs):
            raise ConfigError("episodes are ranked by the environment's reward plus pointwise judges' scores; a "
                              "pairwise judge cannot be summed with them")
        return Scorer(specs, on_error=context.config.judge_on_error)
    if not context.config.judges and not context.data.demo:
        raise ConfigError(
            f"sample-pairs ranks answers with a judge, and its default (demo-rule) grades only the demo task; "
            f"for {context.data_source} name one: --judge rule, --judge reward-model, --judge python, "
            "--judge llm-pairwise"
        )
    specs = resolve_judges(context.host, context.config, context.stage.default_judges, context.artifacts,
                           "stage 'sample-pairs'")
    pairwise = [s for s in specs if s.judge.kind == "pairwise"]
    if pairwise and len(specs) > 1:
        raise ConfigError("a pairwise judge ranks completions alone: give it without other judges")
    return Scorer(specs, pairwise=bool(pairwise), on_error=context.config.judge_on_error)


@attrs.define
class _Ranked:
    """The pairs written so far, and what the metrics count."""

    conversational: bool
    written: list[dict[str, Any]] = attrs.field(factory=list)
    ties: int = 0
    lengths: list[int] = attrs.field(factory=list)

    def add(self, prompt: Any, texts: list[str], scores: list[float], pair: Any, episodes: list[Any] | None = None
            ) -> None:
        """One prompt's best against worst completion (or episode), unless the judge could not tell them apart."""
        if pair.tie:
            self.ties += 1
            return
        chosen, rejected = texts[pair.chosen], texts[pair.rejected]
        extra = {}
        if episodes is not None:  # the episodes' messages after the prompt, and the tools the model was offered
            best, worst = episodes[pair.chosen], episodes[pair.rejected]
            prompt, chosen, rejected = best.prompt, best.messages, worst.messages
            extra = {"tools": best.tools} if best.tools else {}
        elif self.conversational:
            chosen = [{"role": "assistant", "content": chosen.strip()}]
            rejected = [{"role": "assistant", "content": rejected.strip()}]
        self.written.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                             "score_chosen": scores[pair.chosen], "score_rejected": scores[pair.rejected], **extra})

    def metrics(self) -> dict[str, float]:
        def mean(values: list[float]) -> float:
            return sum(values) / len(values) if values else 0.0

        chosen = mean([row["score_chosen"] for row in self.written])
        rejected = mean([row["score_rejected"] for row in self.written])
        return {"pairs": len(self.written), "skipped_ties": self.ties, "score/chosen": chosen,
                "score/rejected": rejected, "score/margin": chosen - rejected,
                "completions/mean_length": mean(self.lengths)}


def _sample_and_rank(draw: Any, model: Any, tokenizer: Any, scorer: Any, rows: list[dict[str, Any]], chunk: range,
                     params: SamplePairsParams, ranked: _Ranked, episodes: Any = None, seed: int = 0) -> None:
    """``num_samples`` completions (or episodes) for each prompt of ``chunk``, judged and ranked into ``ranked``
    (:func:`molting.ranking.rank`: pointwise judges' best against worst, or a pairwise judge's wins)."""
    from molting.environments import episode_seeds, judged_completions
    from molting.judging import data_columns
    from molting.ranking import rank
    from molting.sampling import completion_seeds

    n = params.num_samples
    if episodes is not None:
        repeated = [index for index in chunk for _ in range(n)]
        samples = episodes(draw, model, tokenizer, [rows[i] for i in repeated], repeated,
                           completion_seeds(seed, 0, chunk.start * n, len(repeated)), episode_seeds(seed, 0, repeated))
        sampled_rows = repeated
    else:
        samples = draw(model, tokenizer, [rows[i]["prompt"] for i in chunk], n=n, max_new_tokens=params.max_new_tokens,
                       temperature=params.temperature, top_p=params.top_p, batch_size=params.generation_batch_size)
        sampled_rows = [chunk[r] for r in samples.rows]
    ranked.lengths += samples.lengths.tolist()
    bonus = episodes.rewards(samples) if episodes is not None else None
    ranking = rank(scorer, samples.prompts, judged_completions(samples, plain_text=True), samples.texts, n,
                   data_columns([rows[i] for i in sampled_rows]), sampled_rows, [False] * len(samples.texts),
                   bonus=bonus)
    scores = ranking.scores or ranking.wins
    for position, (index, pair) in enumerate(zip(chunk, ranking.pairs)):
        group = slice(position * n, (position + 1) * n)
        ranked.add(rows[index]["prompt"], samples.texts[group], scores[group], pair,
                   samples.episodes[group] if episodes is not None else None)
