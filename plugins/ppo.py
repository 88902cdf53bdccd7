"""The ``ppo`` stage: online RLHF with PPO (Ziegler et al. 2019; Ouyang et al. 2022), as trl's PPOTrainer.

Each step takes ``batch_size`` prompts and

1. samples one completion per prompt from the policy (KV-cached generation;
   ``temperature``, ``top_p``, ``max_new_tokens``);
2. scores each completion with the run's judges (default: the reward model
   an earlier ``reward-model`` step of the run trained);
3. computes the per-token reward −β·(log π − log π_ref) on every completion
   token plus the judge's score on the last one, the critic's values, and
   the advantages and returns of the advantage estimator (``gae``: γ, λ,
   advantages whitened; see ``molting.plugins.advantages``);
4. optimises the clipped surrogate and the clipped value loss for
   ``num_ppo_epochs`` passes over ``num_mini_batches`` minibatches.

β adapts towards ``kl_target`` when ``adaptive_kl`` is set (Ziegler et al.'s
proportional controller). The critic is a sequence-classification model
(its backbone and scalar head read at every token), initialised from the
reward model when the run has one, as trl does, else from the policy.

The loop is written here rather than on ``transformers.Trainer``: a PPO step
is a rollout followed by several optimisation passes over it, which the
Trainer's one-batch-one-step loop does not express (trl's PPOTrainer
overrides ``train`` for the same reason). accelerate still places the
models and wraps them for several processes.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import attrs

import molting
from molting.context import StageContext
from molting.components import Stage

METRICS = (
    "objective/scores",
    "objective/kl",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/entropy",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "val/ratio",
    "completions/mean_length",
    "kl_coef",
)

_positive = attrs.validators.gt(0)


def _penalty(value: Any) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is not None and not (number and math.isfinite(value) and value >= 0):
        raise ValueError(f"missing_eos_penalty must be a finite number >= 0 (as trl's) or None, got {value!r}")


@attrs.frozen
class PPOParams:
    """PPO's settings; names and defaults as trl's PPOConfig."""

    num_ppo_epochs: int = attrs.field(default=4, validator=_positive)
    num_mini_batches: int = attrs.field(default=1, validator=_positive)
    kl_coef: float = attrs.field(default=0.05, validator=attrs.validators.ge(0))
    adaptive_kl: bool = False
    kl_target: float = attrs.field(default=6.0, validator=_positive)
    kl_horizon: float = attrs.field(default=10000.0, validator=_positive)
    cliprange: float = attrs.field(default=0.2, validator=_positive)
    cliprange_value: float = attrs.field(default=0.2, validator=_positive)
    vf_coef: float = attrs.field(default=0.1, validator=attrs.validators.ge(0))
    whiten_rewards: bool = False
    max_new_tokens: int = attrs.field(default=53, validator=_positive)
    temperature: float = attrs.field(default=0.7, validator=_positive)
    top_p: float = attrs.field(default=1.0, validator=[_positive, attrs.validators.le(1)])
    missing_eos_penalty: float | None = attrs.field(default=None, validator=lambda i, a, v: _penalty(v))
    """Subtracted from the score of a completion that reaches max_new_tokens without an EOS (None: nothing)."""
    eval_prompts: int = attrs.field(default=128, validator=attrs.validators.ge(0))
    """Held-out demo prompts scored by the judges before and after training (0: skip)."""


@molting.hookimpl
def molting_register_stages(register):
    register(
        Stage(
            name="ppo",
            run=run_ppo,
            description="Online RLHF: sample, score with a judge (a reward model), PPO with a critic and a KL penalty.",
            columns=("prompt",),
            default_data="demo-prompts",
            default_advantage="gae",
            metrics=METRICS,
            params=PPOParams,
            produces="policy",
            default_judges={"reward-model": 1.0},
            environments=True,
            demo_defaults={"learning_rate": 3e-5, "epochs": 1.0, "max_new_tokens": 20, "temperature": 1.0},
        )
    )


# --------------------------------------------------------------------------- the math


def ppo_losses(logps, old_logps, advantages, values, old_values, returns, mask, params: PPOParams, count=None):
    """The clipped surrogate and the clipped value loss, with their statistics.

    Token means divide by ``count`` (default: the mask's tokens); several
    processes pass the minibatch's tokens on all of them over the number of
    processes, so that DDP's average of the gradients is the global token mean.
    """
    import torch

    count = mask.sum().clamp(min=1) if count is None else count

    def masked_mean(values, mask):
        return (values * mask).sum() / count

    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - params.cliprange, 1 + params.cliprange)
    policy_loss = masked_mean(torch.max(unclipped, clipped), mask)
    values_clipped = old_values + torch.clamp(values - old_values, -params.cliprange_value, params.cliprange_value)
    value_losses = torch.max((values - returns) ** 2, (values_clipped - returns) ** 2)
    value_loss = 0.5 * masked_mean(value_losses, mask)
    with torch.no_grad():
        stats = {
            "policy/approxkl_avg": 0.5 * masked_mean(log_ratio**2, mask),
            "policy/clipfrac_avg": masked_mean((clipped > unclipped).float(), mask),
            "val/clipfrac_avg": masked_mean(((values - returns) ** 2 < (values_clipped - returns) ** 2).float(), mask),
            "val/ratio": masked_mean(ratio, mask),
            "loss/policy_avg": policy_loss.detach(),
            "loss/value_avg": value_loss.detach(),
        }
    return policy_loss, value_loss, stats


class AdaptiveKL:
    """Ziegler et al.'s proportional controller: β moves so that the KL approaches ``target``."""

    def __init__(self, value: float, target: float, horizon: float) -> None:
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon


# --------------------------------------------------------------------------- models


def token_values(critic, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """The critic's value at each position that predicts a completion token, shape ``(batch, completion tokens)``.

    The classifier's own forward runs (through its DDP wrapper on several
    processes, so its gradients are averaged), and its head's output at every
    position is read by a forward hook: the model returns the last token's only.
    """
    from molting.sampling import sequence_inputs

    input_ids, attention_mask, position_ids = sequence_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    width = completion_ids.size(1)
    captured = []
    head = getattr(critic, "module", critic).score
    handle = head.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        handle.remove()
    return captured[0][:, -width - 1 : -1].squeeze(-1).float()


def load_critic(path, trust_remote_code: bool, dtype: Any = None):
    """A sequence classifier with one output, from a reward-model dir or the policy's causal LM dir."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from molting.errors import ModelError
    from molting.models import load_tokenizer

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a causal LM dir has no value head: the load report says so at length
    path = Path(path)
    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        import json

        path = Path(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])  # its base
    try:
        critic = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype or torch.float32
        )
    except Exception as exc:
        raise ModelError(f"cannot load {path} as the PPO critic (a sequence classifier): {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if critic.config.pad_token_id is None:
        critic.config.pad_token_id = load_tokenizer(path, trust_remote_code).pad_token_id
    return critic.requires_grad_(True)


# --------------------------------------------------------------------------- rollouts


@attrs.frozen
class Rollout:
    """What one PPO step's rollout needs besides the models: its prompts, the KL coefficient, where it runs."""

    rows: list[dict[str, Any]]
    indices: list[int]  # this process's prompts (data rows)
    kl_coef: float
    seeds: list[int]  # one random stream per completion (molting.sampling.completion_seeds)
    max_prompt_length: int | None = None
    draw: Any = None  # the run's sampler (molting.sampling.sampler_for); None: molting.sampling.sample
    episodes: Any = None  # molting.environments.EpisodeRunner with --env: one episode per prompt
    starts: list[int] | None = None  # each episode's seed for environment.start (molting.environments.episode_seeds)


def draw_rollout(m: Any, job: Rollout, params: PPOParams) -> Any:
    """This process's completions (with an environment, its episodes) of the job's prompts."""
    from molting.sampling import sample

    rows = [job.rows[i] for i in job.indices]
    draw = job.draw or sample
    if job.episodes is not None:
        return job.episodes(draw, m.unwrap(m.policy), m.tokenizer, rows, list(job.indices), job.seeds, job.starts)
    return draw(m.unwrap(m.policy), m.tokenizer, [row["prompt"] for row in rows], n=1,
                max_new_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                max_prompt_length=job.max_prompt_length, seeds=job.seeds)


def rollout(m: Any, scorer: Any, job: Rollout, params: PPOParams, advantage: Any, advantage_params: Any):
    """Sample, score and evaluate this process's prompts; the advantages come from every process's rollouts."""
    import torch

    from molting.advantages import last_positions
    from molting.environments import episode_metrics, episode_values, judged_completions
    from molting.judging import data_columns, judged_mean
    from molting.logps import completion_token_logps

    samples = draw_rollout(m, job, params)
    scores, per_judge = scorer(samples.prompts, judged_completions(samples, plain_text=True),
                               data_columns([job.rows[i] for i in job.indices]), rows=list(job.indices))
    if job.episodes is not None:  # the environment's reward, weighted, beside the judges'
        scores = [score + reward for score, reward in zip(scores, job.episodes.rewards(samples))]
    scores = torch.tensor(scores, dtype=torch.float32, device=samples.completion_ids.device)
    skipped = scores.isnan()  # judge_on_error: skip: the completion is left out of the loss
    scores = scores.nan_to_num(0.0)
    if params.missing_eos_penalty is not None:
        scores = scores - params.missing_eos_penalty * samples.truncated.float()
    mask = samples.loss_mask.float() * (~skipped)[:, None]  # the model's own tokens, not an environment's
    inputs = (samples.prompt_ids, samples.prompt_mask, samples.completion_ids, samples.completion_mask)
    with torch.no_grad():
        logps, entropy = completion_token_logps(m.policy, *inputs, temperature=params.temperature, with_entropy=True)
        if m.reference is not None:
            ref_logps, _ = completion_token_logps(m.reference, *inputs, temperature=params.temperature)
        else:
            ref_logps = m.under_reference(lambda p: completion_token_logps(p, *inputs, temperature=params.temperature)[0])
        values = token_values(m.critic, *inputs)
    kl = (logps - ref_logps) * mask
    rewards = -job.kl_coef * kl
    last = last_positions(samples.loss_mask)  # the model's last token (of an episode: its last turn's)
    rewards[torch.arange(len(last)), last] += scores
    advantages, returns = _estimate(m.accelerator, scores, mask, values, rewards, kl, params, advantage,
                                    advantage_params)
    non_score = (-job.kl_coef * kl).sum(dim=1)
    local = {
        "objective/scores": scores.mean(),
        "objective/kl": kl.sum(dim=1).mean(),
        "objective/non_score_reward": non_score.mean(),
        "objective/rlhf_reward": (scores + non_score).mean(),
        "objective/entropy": (entropy * mask).sum(dim=1).mean(),
        "completions/mean_length": samples.lengths.float().mean(),
        **{f"rewards/{name}/mean": torch.tensor(judged_mean(v)) for name, v in per_judge.items()},
    }
    stats = {name: m.accelerator.reduce(value.float().to(mask.device), "mean").item() for name, value in local.items()}
    if samples.episodes is not None:
        stats.update(episode_metrics({name: m.accelerator.gather(values)
                                      for name, values in episode_values(samples).items()}))
    batch = {"samples": samples, "logps": logps, "values": values, "advantages": advantages, "returns": returns,
             "mask": mask}
    return batch, stats


def _estimate(accelerator: Any, scores: Any, mask: Any, values: Any, rewards: Any, kl: Any, params: PPOParams,
              advantage: Any, advantage_params: Any) -> tuple[Any, Any]:
    """The advantage estimator over every process's rollouts (whitening spans the global batch, as in one
    process); this process's rows of its advantages and returns."""
    import torch

    from molting.advantages import masked_whiten
    from molting.components import AdvantageInputs
    from molting.training import gather_rows

    def everyone(tensor: Any) -> Any:
        return gather_rows(accelerator, tensor)

    rows, width = mask.shape
    every_mask, every_rewards = everyone(mask), everyone(rewards)
    if params.whiten_rewards:
        every_rewards = masked_whiten(every_rewards, every_mask, shift_mean=False) * every_mask
    estimated = advantage.compute(AdvantageInputs(
        rewards=accelerator.gather(scores), groups=torch.arange(every_mask.size(0), device=mask.device),
        mask=every_mask, values=everyone(values), token_rewards=every_rewards, kl=everyone(kl)), advantage_params)
    start = accelerator.process_index * rows
    return estimated.advantages[start : start + rows, :width], estimated.returns[start : start + rows, :width]


def optimise(policy, critic, optimizer, accelerator, batch, params: PPOParams, seed: int, max_grad_norm: float):
    """``num_ppo_epochs`` passes of clipped PPO over the rollout, in ``num_mini_batches`` minibatches each."""
    import torch

    from molting.logps import completion_token_logps

    samples, size = batch["samples"], batch["logps"].size(0)
    generator = torch.Generator().manual_seed(seed)
    collected: dict[str, list[float]] = {}
    skipped = 0
    for _ in range(params.num_ppo_epochs):
        order = torch.randperm(size, generator=generator)
        for chunk in order.chunk(min(params.num_mini_batches, size)):
            mb = chunk.to(batch["logps"].device)
            inputs = (samples.prompt_ids[mb], samples.prompt_mask[mb], samples.completion_ids[mb], samples.completion_mask[mb])
            logps, _ = completion_token_logps(policy, *inputs, temperature=params.temperature)
            values = token_values(critic, *inputs)
            count = accelerator.reduce(batch["mask"][mb].sum(), "sum").clamp(min=1) / accelerator.num_processes
            policy_loss, value_loss, stats = ppo_losses(
                logps, batch["logps"][mb], batch["advantages"][mb], values, batch["values"][mb], batch["returns"][mb],
                batch["mask"][mb], params, count,
            )
            loss = policy_loss + params.vf_coef * value_loss
            if not torch.isfinite(loss):
                skipped += 1
                optimizer.zero_grad()
                continue
            accelerator.backward(loss)
            if max_grad_norm > 0:  # 0: no clipping, as the Trainer reads it
                accelerator.clip_grad_norm_(_trainable(policy, critic), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            for name, value in stats.items():  # each process's share of the global token mean: their mean is it
                collected.setdefault(name, []).append(accelerator.reduce(value.detach().float(), "mean").item())
    averaged = {name: sum(v) / len(v) for name, v in collected.items()}
    return averaged, skipped


def _trainable(*models):
    return [p for m in models for p in m.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- the stage


def run_ppo(context: StageContext) -> dict[str, Any]:
    from molting.data import check_prompts
    from molting.environments import episode_runner
    from molting.judging import Scorer, resolve_judges
    from molting.training import LoopEvents, parallelism, save_final_model

    config, params = context.config, context.stage_params
    _refuse_unsupported(config)
    check_prompts(context.rows, context.data_source, "ppo")
    default_judges = {} if context.environment else context.stage.default_judges  # an environment scores episodes
    scorer = Scorer(resolve_judges(context.host, config, default_judges, context.artifacts, "stage 'ppo'",
                                   required=context.environment is None), on_error=config.judge_on_error)
    total = _total_steps(config, len(context.rows))
    events = LoopEvents(context, total)  # before the Accelerator, which building the events' arguments would reset
    accelerator = _accelerator(config)
    models = _prepare_models(context, accelerator, total)
    episodes = episode_runner(context, models.tokenizer, params.max_new_tokens, params.temperature, params.top_p)
    rewards = [f"{s.name}×{s.weight:g}" for s in scorer.specs]
    if episodes is not None:
        rewards.insert(0, f"environment {episodes.environment.name}×{episodes.weight:g} (episodes of up to "
                          f"{episodes.settings.max_turns} turns)")
    print(
        f"molting: world size {accelerator.num_processes} (this is process {accelerator.process_index}), device "
        f"{accelerator.device}, {'bf16 autocast' if accelerator.mixed_precision == 'bf16' else 'fp32'}, "
        f"{parallelism(accelerator)}, "
        f"{len(context.rows)} prompts, {total} PPO steps of {config.batch_size} prompts, rewards "
        f"{', '.join(rewards)}, critic from {models.critic_source}, "
        f"reference model: {'the base model (adapter disabled)' if models.reference is None else 'frozen copy'}",
        file=sys.stderr,
    )
    # the before/after figures are the first process's to record: the others would only repeat its judge calls
    evaluate = _demo_eval(context, models.tokenizer, scorer, params) if accelerator.is_main_process else None
    held_out = _held_out(context, models.tokenizer, params, episodes)
    resumed = _resume(context, models, total)
    if resumed is not None:  # the start model's figures were taken before the run was interrupted
        before = resumed.get("before")
    else:
        before = evaluate(models.unwrap(models.policy)) if evaluate else None
    started = time.perf_counter()
    final = _train(context, models, scorer, total, events, resumed, before, held_out, episodes)
    save_final_model(models.unwrap(models.policy), models.tokenizer, context.output_dir,
                     accelerator.is_main_process, merge=config.merge, trust_remote_code=config.trust_remote_code)
    runtime = time.perf_counter() - started
    final.update(train_runtime=runtime, seconds_per_step=runtime / total)
    if evaluate and before is not None:
        final.update(_before_after(before, evaluate(models.unwrap(models.policy)), scorer))
    final.update({"judge_cache_hits": scorer.hits, **scorer.metrics()})
    if held_out is not None:
        final.update(held_out.summary())
    return final


def _held_out(context: StageContext, tokenizer: Any, params: PPOParams, episodes: Any = None) -> Any:
    """The evaluation during training on ``--eval-data`` / ``--eval-split`` (``None`` without held-out data)."""
    from molting.watch import HeldOutJudging

    if context.eval_rows is None:
        return None
    return HeldOutJudging(context, tokenizer, {"max_new_tokens": params.max_new_tokens,
                                               "temperature": params.temperature, "top_p": params.top_p},
                          episodes=episodes)


def _refuse_unsupported(config: Any) -> None:
    from molting.errors import ConfigError

    unsupported = [flag for flag, value in (("--padding-free", config.padding_free),
                                            ("--precompute-ref", config.precompute_ref)) if value]
    if unsupported:
        raise ConfigError(f"the ppo stage does not support {', '.join(unsupported)} yet")


def _accelerator(config: Any) -> Any:
    """The run's accelerate ``Accelerator`` (several processes: torchrun or ``accelerate launch``)."""
    import torch
    from accelerate import Accelerator

    from molting.training import uses_bf16

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if uses_bf16(config.precision) else "no")


def _total_steps(config: Any, rows: int) -> int:
    """PPO steps of ``batch_size`` prompts per process: ``--max-steps``, else ``--epochs`` passes over the prompts."""
    import os

    per_epoch = math.ceil(rows / (config.batch_size * int(os.environ.get("WORLD_SIZE", "1"))))
    return config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.epochs * per_epoch))


@attrs.define
class _Models:
    """The models of a PPO run, prepared by accelerate, with the optimizer and scheduler they train with."""

    policy: Any
    reference: Any  # None with LoRA: the policy with its adapter disabled is the reference
    critic: Any
    critic_source: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    accelerator: Any

    def unwrap(self, model: Any) -> Any:
        return self.accelerator.unwrap_model(model)

    def under_reference(self, compute: Any) -> Any:
        with self.unwrap(self.policy).disable_adapter():
            return compute(self.policy)


def _prepare_models(context: StageContext, accelerator: Any, total: int) -> _Models:
    """Policy, reference, critic, AdamW and the scheduler, as trl's PPOTrainer sets them up."""
    import torch
    from transformers import get_scheduler

    from molting.models import disable_dropout, torch_dtype
    from molting.training import enable_gradient_checkpointing, load_policy, make_optimizer, reference_for

    config = context.config
    torch.manual_seed(config.seed)
    policy, tokenizer = load_policy(context)
    reference, _, _ = reference_for(policy, context, needed=True)  # None with LoRA: the adapter is disabled instead
    if reference is not None:
        reference.eval().requires_grad_(False)
    critic_source = context.artifacts.get("reward-model") or context.model_path
    critic = load_critic(critic_source, config.trust_remote_code, torch_dtype(config.dtype))
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(policy, critic)
    optimizer = make_optimizer(_trainable(policy, critic), config, eps=1e-5)
    warmup = int(config.warmup_steps * total) if config.warmup_steps < 1 else int(config.warmup_steps)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    if config.disable_dropout is not False:  # as trl: off, so a rollout's log-probs and values are what training sees
        for model in (policy, critic):
            disable_dropout(model)
    # the scheduler is stepped once per PPO step by the loop; accelerate's wrapper would step it once per process
    policy, critic, optimizer = accelerator.prepare(policy, critic, optimizer)
    if reference is not None:
        reference = accelerator.prepare_model(reference, evaluation_mode=True)
    return _Models(policy, reference, critic, critic_source, tokenizer, optimizer, scheduler, accelerator)


def _train(context: StageContext, m: _Models, scorer: Any, total: int, events: Any,
           resumed: dict[str, Any] | None = None, before: dict[str, float] | None = None,
           held_out: Any = None, episodes: Any = None) -> dict[str, Any]:
    """``total`` PPO steps, each a rollout of ``batch_size`` prompts and the passes over it; the last log.

    Every ``--save-steps`` steps (and at the last) a checkpoint keeps the
    policy, the critic and everything the next steps depend on — the
    optimizer and scheduler, the prompt order, the KL coefficient, the
    random state — so a run resumed from it (``resumed``, what
    :func:`_resume` read) follows the uninterrupted one.
    """
    import torch
    from tqdm.auto import tqdm

    from molting.data import iter_rows
    from molting.environments import episode_seeds
    from molting.errors import MoltingError
    from molting.sampling import completion_seeds, sampler_for

    config, params, rows = context.config, context.stage_params, list(iter_rows(context.rows))
    events.attach(model=m.unwrap(m.policy), tokenizer=m.tokenizer, optimizer=m.optimizer, scheduler=m.scheduler)
    log = _Logger(config.logging_steps, events)
    kl = AdaptiveKL(params.kl_coef, params.kl_target, params.kl_horizon)
    generator = torch.Generator().manual_seed(config.seed)
    loop = {"step": 0, "order": [], "skipped_in_a_row": 0, "scores": [], "watch": None}
    if resumed is not None:
        loop.update(step=resumed["step"], order=resumed["order"], skipped_in_a_row=resumed["skipped_in_a_row"],
                    scores=resumed.get("scores", []), watch=resumed.get("watch"))
        if held_out is not None and loop["watch"] is not None:
            held_out.restore(loop["watch"])
        generator.set_state(resumed["generator"])
        kl.value = resumed["kl"]
        log.pending, log.last = resumed["log_pending"], resumed["log_last"]
        events.state.global_step = loop["step"]
    events.train_begin()
    if held_out is not None and loop["step"] == 0:
        _evaluate_held_out(held_out, m, 0, None, events)
    draw = sampler_for(context.host, config.sampler, config.sampler_args, "ppo")
    share, rank = config.batch_size, m.accelerator.process_index
    width = share * m.accelerator.num_processes  # the global batch: every process draws the same order
    for step in tqdm(range(loop["step"] + 1, total + 1), desc="ppo", initial=loop["step"], total=total,
                     disable=not m.accelerator.is_local_main_process):
        events.step_begin()
        while len(loop["order"]) < width:
            loop["order"] += torch.randperm(len(rows), generator=generator).tolist()
        indices, loop["order"] = loop["order"][rank * share : (rank + 1) * share], loop["order"][width:]
        m.policy.eval(), m.critic.eval()
        job = Rollout(rows, indices, kl.value, completion_seeds(config.seed, step, rank * share, share),
                      max(1, config.max_length - params.max_new_tokens), draw, episodes,
                      episode_seeds(config.seed, step, range(rank * share, (rank + 1) * share)))
        batch, stats = rollout(m, scorer, job, params, context.advantage, context.advantage_params)
        m.policy.train(), m.critic.train()
        trained, skipped = optimise(m.policy, m.critic, m.optimizer, m.accelerator, batch, params, config.seed + step,
                                    config.max_grad_norm)
        m.scheduler.step()
        loop["skipped_in_a_row"] = loop["skipped_in_a_row"] + 1 if skipped and not trained else 0
        if loop["skipped_in_a_row"] >= config.max_skipped_steps:
            raise MoltingError(f"PPO step {step}: {loop['skipped_in_a_row']} steps in a row had only non-finite "
                               "losses; stopping")
        if params.adaptive_kl:
            kl.update(float(stats["objective/kl"]), config.batch_size * m.accelerator.num_processes)
        stats.update(trained, kl_coef=kl.value, learning_rate=m.scheduler.get_last_lr()[0])
        events.step_end()
        log(step, stats, last=step == total)
        loop["step"] = step
        loop["scores"].append(float(stats["objective/scores"]))
        if held_out is not None and (step == total or (config.eval_steps and step % config.eval_steps == 0)):
            _evaluate_held_out(held_out, m, step, sum(loop["scores"]) / len(loop["scores"]), events)
            loop["scores"], loop["watch"] = [], held_out.state()
        stopping = held_out is not None and held_out.stopped_at is not None
        if config.save_steps and (step % config.save_steps == 0 or step == total or stopping) \
                and m.accelerator.is_main_process:
            _save(context, m, {**loop, "generator": generator.get_state(), "kl": kl.value, "log_pending": log.pending,
                               "log_last": log.last, "before": before})
        if stopping:
            break
    events.train_end()
    return dict(log.last)


def _evaluate_held_out(held_out: Any, m: _Models, step: int, train_reward: float | None, events: Any) -> None:
    """Sample, judge and measure the held-out prompts; log the figures (``eval_reward``, ``eval_kl``, ...)."""
    from molting.watch import saver

    policy = m.unwrap(m.policy)
    reference = m.reference if m.reference is not None else m.under_reference
    metrics = held_out(policy, step, train_reward, reference=reference, save=saver(policy, m.tokenizer))
    events.log(metrics)


def _save(context: StageContext, m: _Models, loop: dict[str, Any]) -> None:
    from molting.training import save_loop_checkpoint

    save_loop_checkpoint(context.output_dir, loop["step"], {"policy": m.unwrap(m.policy), "critic": m.unwrap(m.critic)},
                         {**loop, "optimizer": m.optimizer.state_dict(), "scheduler": m.scheduler.state_dict()},
                         context.config.save_total_limit)


def _resume(context: StageContext, m: _Models, total: int) -> dict[str, Any] | None:
    """The loop state of the checkpoint ``--resume`` names, its models, optimizer and scheduler loaded; ``None``
    when there is nothing to resume. A checkpoint at the last step leaves nothing to train."""
    from molting.training import load_loop_checkpoint, resume_checkpoint

    checkpoint = resume_checkpoint(context.config, context.output_dir)
    if checkpoint is None:
        return None
    state = load_loop_checkpoint(checkpoint, {"policy": m.unwrap(m.policy), "critic": m.unwrap(m.critic)})
    m.optimizer.load_state_dict(state.pop("optimizer"))
    m.scheduler.load_state_dict(state.pop("scheduler"))
    if state["step"] >= total:
        print(f"molting: {checkpoint} is at step {state['step']} of {total}: nothing left to train; it is the result",
              file=sys.stderr)
    return state


def _before_after(before: dict[str, float], after: dict[str, float], scorer: Any) -> dict[str, float]:
    """The held-out figures as final metrics (``eval_reward_before``, ...), and one line that shows them."""
    print(
        f"molting: held-out judge reward ({', '.join(scorer.names)}): start {before['reward']:.4f} -> trained "
        f"{after['reward']:.4f}; demo task (sampled answers): correct {before['correct']:.3f} -> {after['correct']:.3f}, "
        f"persona {before['persona']:.3f} -> {after['persona']:.3f}, demo judge {before['judge']:.3f} -> "
        f"{after['judge']:.3f}",
        file=sys.stderr,
    )
    return {f"eval_{name}_{when}": values[name] for name in before for when, values in (("before", before),
                                                                                          ("after", after))}


def _demo_eval(context: StageContext, tokenizer: Any, scorer: Any, params: PPOParams) -> Any:
    """On demo data: the judges' mean reward of sampled answers to held-out prompts, and the demo task's
    metrics of the same answers (correct, persona, the demo judge's score); ``None`` elsewhere."""
    if not context.data.demo or params.eval_prompts == 0:
        return None
    from molting import demo

    rows = demo.prompt_rows("test")[: params.eval_prompts]

    def evaluate(model: Any) -> dict[str, float]:
        from molting.evaluation import generate, task_metrics
        from molting.judging import judged_mean

        prompts = [r["prompt"] for r in rows]
        # seed 0 in a forked random state: the training rollouts' randomness stays --seed's
        texts = generate(model, tokenizer, prompts, max_new_tokens=params.max_new_tokens,
                         temperature=params.temperature, top_p=params.top_p, seed=0)
        totals, _ = scorer(prompts, texts, {"answer": [r["answer"] for r in rows]})
        return {"reward": judged_mean(totals), **task_metrics(prompts, texts)}

    return evaluate


class _Logger:
    """Averages metrics over steps and logs them every ``logging_steps`` steps, the first and the last."""

    def __init__(self, every: int, events: Any) -> None:
        self.every = every
        self.events = events
        self.pending: dict[str, list[float]] = {}
        self.last: dict[str, float] = {}

    def __call__(self, step: int, stats: dict[str, Any], last: bool = False) -> None:
        for name, value in stats.items():
            self.pending.setdefault(name, []).append(float(value))
        if step % self.every and step != 1 and not last:
            return
        record = {name: sum(v) / len(v) for name, v in self.pending.items()}
        self.pending.clear()
        self.last = {"step": step, **record}
        self.events.log(record)
