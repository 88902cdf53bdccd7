"""The ``online-dpo`` stage: online DPO (Guo et al., 2024, "Direct Language Model Alignment from Online AI
Feedback", arXiv:2402.04792), as an outside package.

Offline DPO trains on pairs someone wrote down once; online DPO makes its
pairs from the policy being trained, so they never go stale. Every
optimizer step:

1. **sample**: a batch of prompts, ``num_samples`` completions each (2, as
   in the paper and trl), from the *current* policy
   (:mod:`.trainer`, with :func:`molting.sampling.sample`);
2. **rank**: the run's judges pick the best and the worst completion of each
   prompt: the chosen/rejected pair (:mod:`molting.ranking`; a tie is left out);
3. **train**: the pairs go through the policy and the reference exactly as an
   offline preference batch does (:class:`molting.pairs.PairCollator`,
   :func:`molting.pairs.preference_inputs`), so any loss of the
   ``preference`` stage applies: ``dpo`` by default, ``--loss ipo=1``,
   ``--plugin online-dpo --loss simpo=1`` ... The stage declares
   ``inputs=molting.PreferenceInputs``, which is what lets molting run those
   losses here.

Batches follow trl's ``OnlineDPOTrainer``: ``batch_size`` counts *prompts*
per device and micro-step (trl's ``per_device_train_batch_size``), each
micro-step samples its own, and the log-probs are the policy's own (logits
not divided by the sampling temperature), as trl computes them.

Metrics have trl's names (see :data:`METRICS`). ``objective/*`` are computed
over both completions of every prompt, ties included, as trl does;
``rewards/*`` and ``logps/*`` over the pairs the loss trains on.
``objective/kl``, ``objective/non_score_reward`` and
``objective/rlhf_reward`` need a reference model (a loss such as ``simpo``
runs without one); ``objective/scores*`` and ``objective/rlhf_reward`` need
pointwise judges (a pairwise judge gives verdicts, not scores); ``beta`` and
the last two a loss with a β.

Checkpoints and ``--resume`` are the Trainer's: a resumed run restores the
weights, the optimizer, the scheduler and the random state, skips the
prompt batches already trained on (cheaply: prompts are sampled from only
when a batch is trained on), and samples fresh completions from the
restored policy. Nothing sampled before the interruption is kept.

This module registers the stage and must import without torch, so that
``molting --help`` stays fast: the Trainer lives in :mod:`.trainer`, which
the stage imports when it runs.
"""

from __future__ import annotations

from typing import Any

import attrs

import molting
from molting.context import StageContext
from molting.pairs import METRICS as PAIR_METRICS

NAME = "online-dpo"

METRICS = (
    *PAIR_METRICS,  # loss, rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}: trl's DPO names
    "objective/kl",  # mean over completions of Σ_t log π/π_ref (needs a reference)
    "objective/entropy",  # mean over completions of -Σ_t log π: trl's sample estimate of the sequence entropy
    "objective/non_score_reward",  # mean of -β·KL (needs a reference and a β)
    "objective/rlhf_reward",  # mean of score - β·KL (needs pointwise judges, a reference and a β)
    "objective/scores",  # mean judge score of every sampled completion (pointwise judges)
    "objective/scores_margin",  # mean score of chosen minus rejected, over every prompt (pointwise judges)
    "val/contain_eos_token",  # fraction of completions that end within max_new_tokens
    "beta",  # the loss's β (when it has one), as trl logs it
    "frac_ties",  # molting's: fraction of prompts whose completions the judge could not tell apart
    "completions/mean_length",  # molting's (trl's GRPO name): mean completion length in tokens
)
"""What every run with the default loss and judge logs; see the module docstring for the conditions."""


# --------------------------------------------------------------------------- settings


def _whole(minimum: int):
    """An attrs validator: a whole number (not a bool) of at least ``minimum``."""

    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
            raise ValueError(f"{attribute.name} must be a whole number >= {minimum}, got {value!r}")

    return validate


def _number(minimum: float, strict: bool = False, maximum: float | None = None):
    """An attrs validator: a number (not a bool) > or ≥ ``minimum``, and ≤ ``maximum`` when given."""

    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        low = number and (value > minimum if strict else value >= minimum)
        if not (low and (maximum is None or value <= maximum)):
            bound = f"{'>' if strict else '>='} {minimum:g}" + (f" and <= {maximum:g}" if maximum is not None else "")
            raise ValueError(f"{attribute.name} must be a number {bound}, got {value!r}")

    return validate


@attrs.frozen
class OnlineDPOParams:
    """The stage's own settings (top-level recipe keys or ``--set``); the loss's (β, ...) are the loss's."""

    num_samples: int = attrs.field(default=2, validator=_whole(2))
    """Completions sampled per prompt; the best and the worst make the pair. 2 is the paper's and trl's; more
    make a decisive pair likelier (and cost more sampling, not more training: only two go through the loss)."""
    max_new_tokens: int = attrs.field(default=64, validator=_whole(1))
    """Longest completion in tokens (trl's default 64); prompts are cut to max_length minus this."""
    temperature: float = attrs.field(default=0.9, validator=_number(0, strict=True))
    """Sampling temperature (trl's default 0.9): the two samples must differ for the judge to have a choice."""
    top_p: float = attrs.field(default=1.0, validator=_number(0, strict=True, maximum=1))
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: all)."""
    top_k: int = attrs.field(default=0, validator=_whole(0))
    """Keep only the k likeliest tokens when sampling (0: no top-k filtering)."""
    missing_eos_penalty: float = attrs.field(default=0.0, validator=_number(0))
    """Subtracted from the score of a completion with no EOS within max_new_tokens (trl's missing_eos_penalty),
    so that rambling loses to finishing; 0: no penalty."""
    skip_ties: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    """Leave a prompt out of the loss when its completions tie (a tie teaches nothing); false: train on it with
    the first completion chosen, as trl's OnlineDPOTrainer does."""


# --------------------------------------------------------------------------- registration


@molting.hookimpl
def molting_register_stages(register):
    register(
        molting.Stage(
            name=NAME,
            run=run_online_dpo,
            description="Online DPO: sample two answers per prompt from the current policy, judge, train on the pair.",
            columns=("prompt",),
            default_loss="dpo",
            default_data="demo-prompts",
            metrics=METRICS,
            params=OnlineDPOParams,
            produces="policy",
            inputs=molting.PreferenceInputs,  # so every loss of the preference stage runs here (--loss ipo=1)
            default_judges={"demo-rule": 1.0},
            # 8 prompts x 2 samples a step, 100 steps: well under a minute of training on 2 CPU cores
            demo_defaults={"learning_rate": 5e-5, "batch_size": 8, "max_steps": 100, "max_new_tokens": 20,
                           "lr_scheduler_type": "constant"},
        )
    )


# --------------------------------------------------------------------------- the stage


def run_online_dpo(context: StageContext) -> dict[str, Any]:
    """Check the settings and rows, load the policy, its reference and the judges, then train and save."""
    from molting.data import check_prompts
    from molting.sampling import prompt_rows, sampler_for
    from molting.training import announce, load_policy, reference_for, stage_callbacks, train_and_save, training_arguments

    from .trainer import OnlineDPOTrainer

    config, params = context.config, context.stage_params
    prompt_limit = check_settings(config, params)
    check_prompts(context.rows, context.data_source, NAME)  # before anything loads: a bad row costs nothing
    scorer = judges_for(context)
    model, tokenizer = load_policy(context)
    items = prompt_rows(context.rows, tokenizer, prompt_limit, config.overlong, context.data_source, NAME)
    ref_model, adapter_reference, reference = reference_for(model, context)
    trainer = OnlineDPOTrainer(
        model=model, args=training_arguments(config, context.output_dir), train_dataset=items,
        processing_class=tokenizer, callbacks=stage_callbacks(context), loss=context.loss,
        loss_params=context.loss_params, ref_model=ref_model, adapter_reference=adapter_reference,
        online=params, scorer=scorer, max_prompt_length=prompt_limit if config.overlong != "drop" else None,
        draw=sampler_for(context.host, config.sampler, config.sampler_args, "online-dpo"),
    )
    judges = ", ".join(f"{spec.name} x{spec.weight:g}" for spec in scorer.specs)
    announce(trainer, f"{len(items)} prompts, {params.num_samples} samples each, {config.batch_size} prompts per "
                      f"micro-step, judges {judges}, loss {context.loss.name}", reference)
    return train_and_save(trainer, tokenizer, context)


def check_settings(config: molting.RunConfig, params: OnlineDPOParams) -> int:
    """Refuse the run settings that do not apply to a stage that samples every step; return the prompt limit."""
    from molting.errors import ConfigError

    offline = [flag for flag, on in (("--precompute-ref", config.precompute_ref), ("--padding-free", config.padding_free),
                                     ("--group-by-length", config.group_by_length)) if on]
    if offline:
        raise ConfigError(f"the {NAME} stage samples new completions every step: {', '.join(offline)} "
                          "apply to stages that train on fixed data")
    limit = config.max_length - params.max_new_tokens
    if limit < 1:
        raise ConfigError(f"max_length ({config.max_length}) must exceed max_new_tokens ({params.max_new_tokens}): "
                          "it bounds prompt and completion together")
    return limit


def judges_for(context: StageContext) -> Any:
    """The run's judges as a :class:`molting.judging.Scorer`: pointwise ones summed by weight, or one pairwise."""
    from molting.errors import ConfigError
    from molting.judging import Scorer, resolve_judges

    if not context.config.judges and not context.data.demo:
        raise ConfigError(
            f"{NAME} ranks its samples with a judge, and its default (demo-rule) grades only the demo task; for "
            f"{context.data_source} name one: --judge rule, --judge reward-model, --judge python, --judge llm-pairwise"
        )
    specs = resolve_judges(context.host, context.config, context.stage.default_judges, context.artifacts,
                           f"stage {NAME!r}")
    pairwise = [spec for spec in specs if spec.judge.kind == "pairwise"]
    if pairwise and len(specs) > 1:
        raise ConfigError("a pairwise judge ranks completions alone: give it without other judges")
    return Scorer(specs, pairwise=bool(pairwise), on_error=context.config.judge_on_error)
