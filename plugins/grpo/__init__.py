"""The ``grpo`` stage: Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath, arXiv:2402.03300).

For each prompt the policy samples G completions (``num_generations``); the
run's judges score them; the advantage estimator (``--advantage``; by
default ``grpo``: each completion's reward minus the mean of its group,
divided by the group's standard deviation, or the batch's, or not at all:
``scale_rewards``; also ``rloo``, ``reinforce++``, ``remax``: see
``molting.plugins.advantages``) turns the rewards into advantages; the loss
plugin (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``gspo``, ``cispo``,
``sapo``) applies its objective, with a KL penalty to the starting model
when β > 0. No value model, and no reference model at β = 0.

Batches are trl's ``GRPOTrainer``'s: ``batch_size`` counts completions per
device and micro-step (``per_device_train_batch_size``); one generation
batch, ``batch_size × gradient_accumulation_steps × processes`` completions
(that many / G prompts), is sampled once per optimizer step and cut into
the accumulation steps' micro-batches, so every micro-batch is on-policy.
With ``num_iterations`` μ > 1 the same generation batch serves μ optimizer
steps, and the log-probs of the policy that sampled it are computed once,
for the importance ratio. trl's ``RepeatSampler`` yields each generation
batch μ·S times, so the Trainer's own loop, checkpoints and resumption work
unchanged; the batch is sampled on the first of them.

With ``--env NAME`` each completion is a multi-turn episode of the
environment (:mod:`molting.environments`): tool calls run, the
environment's tokens are masked out of the loss, the KL term and the
entropy, and the reward is the environment's (times ``env_weight``) plus the
judges' (none by default); the advantages are group-relative over whole
episodes. ``max_new_tokens`` then bounds each model turn.

Metrics (trl's names): ``reward``, ``reward_std``, ``rewards/{judge}/mean``
and ``/std``, ``frac_reward_zero_std``, ``completions/*``, ``entropy``,
``clip_ratio/{low,high,region}_mean`` and, with β > 0, ``kl``; with an
environment, ``env/*`` and ``tools/*`` (:data:`molting.environments.ENV_METRICS`).
"""

from __future__ import annotations

from typing import Any

import attrs

import molting
from molting.context import StageContext
from molting.components import Stage

METRICS = (
    "loss",
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "completions/mean_length",
    "completions/min_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "completions/mean_terminated_length",
)
"""Logged by every run; ``rewards/{judge}/mean`` and ``/std`` (one pair per judge) and ``kl`` (β > 0) as well."""


def _whole(minimum: int):
    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
            raise ValueError(f"{attribute.name} must be a whole number >= {minimum}, got {value!r}")

    return validate


@attrs.frozen
class GRPOParams:
    num_generations: int = attrs.field(default=8, validator=_whole(2))
    """Completions sampled per prompt (G): the group whose mean reward is the baseline."""
    max_new_tokens: int = attrs.field(default=256, validator=_whole(1))
    """Longest completion in tokens (trl's max_completion_length); Dr. GRPO's normaliser."""
    temperature: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    top_p: float = attrs.field(default=1.0, validator=[attrs.validators.gt(0), attrs.validators.le(1)])
    top_k: int = attrs.field(default=0, validator=_whole(0))
    """0: no top-k filtering."""
    num_iterations: int = attrs.field(default=1, validator=_whole(1))
    """Optimizer steps per generation batch (μ in the paper)."""
    mask_truncated_completions: bool = False
    """Leave completions cut at max_new_tokens (no end-of-sequence token) out of the loss, as DAPO does."""
    beta: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    """KL coefficient (shared with the loss); > 0 loads the reference model."""
    top_entropy_quantile: float = attrs.field(default=1.0, validator=[attrs.validators.gt(0), attrs.validators.le(1)])
    """Train the policy term only on the tokens in this top fraction of entropy (trl's; 0.2 in "Beyond the 80/20
    rule", arXiv:2506.01939); 1.0: every token."""


@molting.hookimpl
def molting_register_stages(register):
    register(
        Stage(
            name="grpo",
            run=run_grpo,
            description="Online RL: G sampled completions per prompt, judged, group-relative advantages, clipped ratio.",
            columns=("prompt",),
            default_loss="grpo",
            default_advantage="grpo",
            default_data="demo-prompts",
            metrics=METRICS,
            inputs=molting.GroupInputs,
            params=GRPOParams,
            produces="policy",
            default_judges={"rule": 1.0},
            environments=True,
            # 2 prompts x 8 completions a step, 120 steps: 20-35 s of training on 2 CPU cores
            demo_defaults={"learning_rate": 5e-5, "batch_size": 16, "max_steps": 120, "num_generations": 8,
                           "max_new_tokens": 20, "beta": 0.0, "lr_scheduler_type": "constant"},
        )
    )


# --------------------------------------------------------------------------- training


# --------------------------------------------------------------------------- the stage


def run_grpo(context: StageContext) -> dict[str, Any]:
    from trl.trainer.utils import identity

    from molting.data import check_prompts
    from molting.environments import episode_runner
    from molting.errors import ConfigError, DataError
    from molting.judging import Scorer, resolve_judges
    from molting.sampling import prompt_rows, sampler_for
    from molting.training import (announce, load_policy, reference_for, stage_callbacks, train_and_save,
                                  training_arguments)

    config, params = context.config, context.stage_params
    if config.precompute_ref or config.padding_free:
        raise ConfigError("the grpo stage samples new completions every step: --precompute-ref and --padding-free "
                          "do not apply to it")
    if params.num_iterations > 1 and config.save_steps % params.num_iterations:
        raise ConfigError(
            f"--save-steps ({config.save_steps}) must be a multiple of num_iterations ({params.num_iterations}): a "
            "checkpoint between the optimizer steps that share one generation batch could not be resumed exactly "
            "(the batch is not in the checkpoint)")
    limit = config.max_length - params.max_new_tokens
    if limit < 1:
        raise ConfigError(f"max_length ({config.max_length}) must exceed max_new_tokens ({params.max_new_tokens}): "
                          "it bounds prompt and completion together")
    check_prompts(context.rows, context.data_source, "grpo")  # before any model loads
    default_judges = {} if context.environment else context.stage.default_judges  # an environment scores episodes
    scorer = Scorer(resolve_judges(context.host, config, default_judges, context.artifacts, "stage 'grpo'",
                                   required=context.environment is None), on_error=config.judge_on_error)
    model, tokenizer = load_policy(context, keep_dropout=True)
    episodes = episode_runner(context, tokenizer, params.max_new_tokens, params.temperature, params.top_p, params.top_k)
    if episodes is not None:
        limit = episodes.settings.max_prompt_length
    args = training_arguments(config, context.output_dir)
    g = params.num_generations
    completions = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    if completions % g:
        raise ConfigError(
            f"batch_size counts completions, as trl's per_device_train_batch_size does: batch_size x "
            f"gradient_accumulation_steps x processes ({completions}) must be a multiple of num_generations ({g}), "
            f"e.g. --batch-size {g * max(1, round(config.batch_size / g))}"
        )
    rows = prompt_rows(context.rows, tokenizer, limit, config.overlong, context.data_source, "grpo")
    if len(rows) < completions // g:
        raise DataError(f"{context.data_source} has {len(rows)} usable prompts; one generation batch needs "
                        f"{completions // g} ({completions} completions / {g} per prompt)")
    needs = context.advantage.requirements(context.advantage_params)
    ref_model, adapter_reference, reference = reference_for(model, context,
                                                            needed=params.beta > 0 or "reference" in needs)
    from .trainer import GRPOTrainer

    trainer = GRPOTrainer(
        model=model, args=args, train_dataset=rows,
        data_collator=identity, processing_class=tokenizer, callbacks=stage_callbacks(context), loss=context.loss,
        loss_params=context.loss_params, ref_model=ref_model, adapter_reference=adapter_reference, grpo=params,
        scorer=scorer, max_prompt_length=limit if config.overlong != "drop" else None,
        advantage=context.advantage, advantage_params=context.advantage_params,
        draw=sampler_for(context.host, config.sampler, config.sampler_args, "grpo"), episodes=episodes,
    )
    judging = None
    if context.eval_rows is not None:
        from molting.watch import HeldOutCallback, HeldOutJudging

        judging = HeldOutJudging(context, tokenizer, {"max_new_tokens": params.max_new_tokens, "top_p": params.top_p,
                                                      "temperature": params.temperature}, episodes=episodes)
        trainer.add_callback(HeldOutCallback(judging, trainer, context))
    rewards = [f"{spec.name} x{spec.weight:g}" for spec in scorer.specs]
    if episodes is not None:
        rewards.insert(0, f"environment {episodes.environment.name} x{episodes.weight:g}")
    what = (f"episodes of {episodes.environment.name} (up to {episodes.settings.max_turns} turns, "
            f"{episodes.settings.max_episode_tokens} tokens)" if episodes else "completions")
    announce(trainer, f"{len(rows)} prompts, {g} {what} each, {completions // g} prompts per optimizer step, "
                      f"rewards {', '.join(rewards) or 'none'}, advantages {context.advantage.name}", reference)
    final = train_and_save(trainer, tokenizer, context)
    return {**final, **(judging.summary() if judging else {})}
