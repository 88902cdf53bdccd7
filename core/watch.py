"""What a run watches on held-out data: the best model so far, and signs of reward hacking.

* :class:`BestKeeper` (``--keep-best METRIC``) keeps the model of the best
  evaluation in ``OUTPUT/best`` (written whole, then renamed into place) and
  says which step it was;
* :class:`HackingWatch` looks at each evaluation of an online stage: the
  training reward rising while the held-out judges' score falls over the last
  ``hacking_window`` evaluations (the fall larger than twice its standard
  error), held-out answers growing past ``hacking_length_factor`` times their
  first length, or their KL to the reference past ``hacking_max_kl``;
* :class:`HeldOutJudging` is the evaluation online stages share: sample the
  held-out prompts (a fixed seed), score them with the held-out judges
  (``--eval-judge``, else the run's), measure lengths and KL, and feed both.

A stage returns ``best`` and ``watch`` (:meth:`BestKeeper.summary`,
:meth:`HackingWatch.summary`) among its final metrics; the pipeline moves them
into ``molting_run.json`` and the model card.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import attrs

from molting.errors import ConfigError

BEST_DIR = "best"


class BestKeeper:
    """Keeps the model of the best value of one logged metric (lower is better for ``*loss``, or as ``:min``/``:max``)."""

    def __init__(self, spec: str, output_dir: Path) -> None:
        name, _, direction = spec.partition(":")
        self.metric = name
        self.lower = direction == "min" or (not direction and name.endswith("loss"))
        self.output_dir = Path(output_dir)
        self.best: dict[str, Any] | None = None

    def value_in(self, metrics: Mapping[str, Any]) -> float | None:
        """The watched metric in one evaluation's ``metrics`` (``loss`` finds ``eval_loss``); an error naming the
        metrics there are when it is in none of them."""
        for name in (self.metric, f"eval_{self.metric}"):
            if isinstance(metrics.get(name), (int, float)):
                return float(metrics[name])
        evaluated = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        raise ConfigError(f"--keep-best {self.metric}: the evaluation logged no such metric; it logged "
                          f"{', '.join(evaluated) or 'nothing'}")

    def consider(self, metrics: Mapping[str, Any], step: int, save: Callable[[Path], None]) -> bool:
        """Whether this evaluation is the best so far; if so its model is saved (``save(directory)``) as ``best``."""
        value = self.value_in(metrics)
        if value is None or not math.isfinite(value):
            return False
        if self.best is not None and (value >= self.best["value"] if self.lower else value <= self.best["value"]):
            return False
        from molting.context import is_main_process
        from molting.training import disk_full_is_an_error

        staging, final = self.output_dir / f".staging-{BEST_DIR}", self.output_dir / BEST_DIR
        main = is_main_process()  # every process calls save (a sharded model gathers); only the first writes
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        with disk_full_is_an_error(staging, f"the best model (step {step}) in {self.output_dir}", self.output_dir):
            save(staging)
        if main:
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
        self.best = {"metric": self.metric, "value": value, "step": step, "path": str(final),
                     "direction": "min" if self.lower else "max"}
        return True

    def summary(self) -> dict[str, Any] | None:
        if self.best is not None:
            print(f"molting: best {self.metric} {self.best['value']:.4g} at step {self.best['step']}: kept in "
                  f"{self.best['path']}", file=sys.stderr)
        return self.best


@attrs.define
class HackingWatch:
    """Alarms from a run's evaluations: training reward up while the held-out score falls, length, KL."""

    window: int = 3
    length_factor: float = 2.0
    max_kl: float | None = None
    evaluations: list[dict[str, Any]] = attrs.field(factory=list)
    alarms: list[dict[str, Any]] = attrs.field(factory=list)

    def observe(self, step: int, train_reward: float | None, scores: list[float], length: float,
                kl: float | None = None) -> list[dict[str, Any]]:
        """Record one evaluation (``scores``: the held-out judges' score of each prompt, in the same order every
        time); the alarms it raises, each printed as a warning with its figures."""
        self.evaluations.append({"step": step, "train_reward": train_reward, "held_out": sum(scores) / len(scores),
                                 "length": length, "kl": kl, "scores": list(scores)})
        raised = [alarm for alarm in (self._diverging(), self._growing(), self._drifting()) if alarm]
        for alarm in raised:  # each kind is printed the first time; every one is recorded
            alarm["step"] = step
            if all(earlier["kind"] != alarm["kind"] for earlier in self.alarms):
                _warn(f"molting: warning: possible reward hacking at step {step}: {alarm['message']}")
        self.alarms += raised
        return raised

    def _diverging(self) -> dict[str, Any] | None:
        """The training reward up and the held-out score down across the window, the fall beyond noise: more than
        twice the standard error of the per-prompt differences (the same prompts both times: a paired test)."""
        recent = self.evaluations[-self.window :]
        rewarded = [e for e in recent if e["train_reward"] is not None]  # the evaluation before training has none
        if len(recent) < self.window or len(rewarded) < 2:
            return None
        first, last = recent[0], recent[-1]
        rise = rewarded[-1]["train_reward"] - rewarded[0]["train_reward"]
        drops = [a - b for a, b in zip(first["scores"], last["scores"])]
        fall = sum(drops) / len(drops)
        noise = 2 * _std(drops) / math.sqrt(len(drops))
        if rise <= 0 or fall <= 0 or fall <= noise:
            return None
        return {"kind": "reward-diverges", "train_reward": [rewarded[0]["train_reward"], rewarded[-1]["train_reward"]],
                "held_out": [first["held_out"], last["held_out"]], "steps": [first["step"], last["step"]],
                "message": f"the training reward rose {rewarded[0]['train_reward']:.3f} -> "
                           f"{rewarded[-1]['train_reward']:.3f} while the held-out judges' score fell "
                           f"{first['held_out']:.3f} -> {last['held_out']:.3f} over steps {first['step']}-{last['step']} "
                           f"(paired over {len(drops)} prompts: twice its standard error is {noise:.3f})"}

    def _growing(self) -> dict[str, Any] | None:
        start, now = self.evaluations[0]["length"], self.evaluations[-1]["length"]
        if start <= 0 or now <= self.length_factor * start:
            return None
        return {"kind": "length", "length": [start, now],
                "message": f"held-out answers grew from {start:.1f} to {now:.1f} tokens, past {self.length_factor:g}x "
                           "their length at the first evaluation"}

    def _drifting(self) -> dict[str, Any] | None:
        kl = self.evaluations[-1]["kl"]
        if self.max_kl is None or kl is None or kl <= self.max_kl:
            return None
        return {"kind": "kl", "kl": kl,
                "message": f"the held-out answers' KL to the reference is {kl:.2f} nats, past {self.max_kl:g}"}

    def summary(self) -> dict[str, Any]:
        evaluations = [{k: v for k, v in e.items() if k != "scores"} for e in self.evaluations]
        return {"fired": bool(self.alarms), "alarms": self.alarms, "evaluations": evaluations,
                "settings": {"window": self.window, "length_factor": self.length_factor, "max_kl": self.max_kl}}


class HeldOutJudging:
    """An online stage's evaluation during training: the held-out prompts sampled, judged, measured.

    ``sampling`` holds :func:`molting.evaluation.seeded_sample`'s settings
    (``max_new_tokens``, ``temperature``, ``top_p``: the stage's own;
    ``--eval-temperature`` overrides the temperature, 0 for greedy answers);
    the seed is fixed, so each evaluation answers the same prompts with the
    same random numbers. The KL to the reference is measured on sampled
    answers only (temperature > 0).
    """

    def __init__(self, context: Any, tokenizer: Any, sampling: Mapping[str, Any], episodes: Any = None) -> None:
        from molting.data import check_prompts, iter_rows
        from molting.judging import Scorer, data_columns

        config = context.config
        check_prompts(context.eval_rows, str(context.eval_data), f"{context.stage.name} (held-out data)")
        self.rows = list(iter_rows(context.eval_rows))[: config.eval_max_prompts]
        self.prompts = [row["prompt"] for row in self.rows]
        self.columns = data_columns(self.rows)
        # every evaluation scores the same prompts (the watch pairs them), so a skipped judgement scores 0 here
        on_error = "zero" if context.config.judge_on_error == "skip" else context.config.judge_on_error
        self.scorer = Scorer(eval_judges(context), on_error=on_error)
        self.tokenizer, self.sampling = tokenizer, dict(sampling)
        self.episodes = episodes  # molting.environments.EpisodeRunner: held-out episodes instead of answers
        if config.eval_temperature is not None:
            self.sampling["temperature"] = config.eval_temperature
        self.keeper = BestKeeper(config.keep_best or "eval_reward:max", context.output_dir) \
            if config.keep_best or config.stop_on_hacking else None
        self.watch = HackingWatch(config.hacking_window, config.hacking_length_factor, config.hacking_max_kl)
        self.stop = config.stop_on_hacking
        self.stopped_at: int | None = None
        self.output_dir = context.output_dir
        self.answers: dict[str, tuple[list[str], list[float]]] = {}  # the first and the latest evaluation's

    def __call__(self, policy: Any, step: int, train_reward: float | None, reference: Any = None,
                 save: Callable[[Path], None] | None = None) -> dict[str, float]:
        """Evaluate ``policy`` at ``step``: its metrics (``eval_reward``, ...); the watch and the keeper fed.

        ``reference`` runs a function under the reference model (``None``:
        no KL); ``save(directory)`` writes the policy, for the best model.
        """
        from molting.compare import sequence_kl
        from molting.environments import judged_completions

        samples = self.sample(policy)
        totals, per_judge = self.scorer(self.prompts, judged_completions(samples), self.columns)
        if self.episodes is not None:
            totals = [total + reward for total, reward in zip(totals, self.episodes.rewards(samples))]
        self.answers.setdefault("before", (samples.texts, totals))
        self.answers["after"] = (samples.texts, totals)
        lengths = samples.lengths.float()
        metrics = {"eval_reward": sum(totals) / len(totals), "eval_reward_std": float(_std(totals)),
                   **{f"eval_rewards/{name}/mean": sum(v) / len(v) for name, v in per_judge.items()},
                   "eval_completions/mean_length": lengths.mean().item(),
                   "eval_completions/clipped_ratio": samples.truncated.float().mean().item()}
        if reference is not None and self.sampling["temperature"] > 0:
            metrics["eval_kl"] = sum(sequence_kl(policy, reference, samples, self.sampling["temperature"])) / len(totals)
        alarms = self.watch.observe(step, train_reward, totals, metrics["eval_completions/mean_length"],
                                    metrics.get("eval_kl"))
        if self.keeper is not None and save is not None:
            self.keeper.consider(metrics, step, save)
        if alarms and self.stop and self.stopped_at is None:
            self.stopped_at = step
            print(f"molting: --stop-on-hacking: stopping at step {step}", file=sys.stderr)
        return metrics

    def sample(self, policy: Any) -> Any:
        """The held-out answers (episodes, with an environment) of ``policy``, from the same seed every time."""
        from molting.environments import episode_seeds
        from molting.evaluation import seeded_sample
        from molting.sampling import sample

        if self.episodes is None:
            return seeded_sample(policy, self.tokenizer, self.prompts, **self.sampling)
        count, options = len(self.rows), {"temperature": self.sampling["temperature"]}
        return self.episodes(sample, policy, self.tokenizer, self.rows, list(range(count)), list(range(count)),
                             episode_seeds(0, 0, list(range(count))), **options)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the evaluations so far (:meth:`restore` reads it back)."""
        return {"evaluations": list(self.watch.evaluations), "alarms": list(self.watch.alarms),
                "best": self.keeper.best if self.keeper else None, "stopped_at": self.stopped_at,
                "answers": {k: [list(v[0]), list(v[1])] for k, v in self.answers.items()}}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.watch.evaluations, self.watch.alarms = list(state["evaluations"]), list(state["alarms"])
        if self.keeper is not None:
            self.keeper.best = state["best"]
        self.stopped_at = state["stopped_at"]
        self.answers = {k: (list(texts), list(scores)) for k, (texts, scores) in state.get("answers", {}).items()}

    def summary(self) -> dict[str, Any]:
        """``best`` and ``watch`` for the stage's final metrics; the first and the last evaluation's answers to the
        first held-out prompts written side by side (:data:`molting.evaluation.SAMPLES_FILE`)."""
        from molting.context import is_main_process
        from molting.evaluation import SAMPLES_FILE, SHOWN_SAMPLES, write_samples

        if "before" in self.answers and is_main_process():
            (before, before_scores), (after, after_scores) = self.answers["before"], self.answers["after"]
            write_samples(self.output_dir / SAMPLES_FILE, [
                {"prompt": p, "before": b, "after": a, "before_score": bs, "after_score": s_}
                for p, b, a, bs, s_ in list(zip(self.prompts, before, after, before_scores, after_scores))[:SHOWN_SAMPLES]])
        return {"best": self.keeper.summary() if self.keeper else None,
                "watch": {**self.watch.summary(), "stopped_at": self.stopped_at}}


def saver(model: Any, tokenizer: Any) -> Callable[[Path], None]:
    """A ``save(directory)`` for :class:`BestKeeper`: the model (a LoRA run: its adapter) and tokenizer, safetensors."""

    def save(directory: Path) -> None:
        from molting.context import is_main_process

        if is_main_process():
            model.save_pretrained(str(directory), safe_serialization=True)
            tokenizer.save_pretrained(str(directory))

    return save


def eval_judges(context: Any) -> list[Any]:
    """The held-out judges of an online stage: ``--eval-judge``, else the run's judges, with their ``judge_args``."""
    from molting.judging import resolve_judges

    config = context.config
    weights = dict(config.eval_judges or config.judges or context.stage.default_judges)
    scoped = attrs.evolve(config, judges=weights, judge_args={k: v for k, v in config.judge_args.items() if k in weights})
    return resolve_judges(context.host, scoped, weights, context.artifacts, f"stage {context.stage.name!r} (held-out)")


def _warn(message: str) -> None:
    """A line on stderr that a progress bar running at the time does not overwrite."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


# --------------------------------------------------------------------------- for stages built on transformers.Trainer


def _trainer_callback() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class KeepBestCallback(_trainer_callback()):
    """``--keep-best`` for a Trainer's own evaluations (offline stages): each ``on_evaluate`` considered."""

    def __init__(self, keeper: BestKeeper, trainer: Any) -> None:
        self.keeper, self.trainer = keeper, trainer

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.keeper.consider(metrics or {}, state.global_step, self._save)

    def _save(self, directory: Path) -> None:
        self.trainer.save_model(str(directory))  # every process; the Trainer writes on the first
        if self.trainer.is_world_process_zero():
            (directory / "training_args.bin").unlink(missing_ok=True)


class HeldOutCallback(_trainer_callback()):
    """:class:`HeldOutJudging` in a Trainer-based online stage (GRPO): before training, every ``--eval-steps``
    steps and at the end; the training reward is the mean of the ``reward_key`` logs since the last evaluation."""

    def __init__(self, judging: HeldOutJudging, trainer: Any, context: Any, reward_key: str = "reward") -> None:
        self.judging, self.trainer, self.context, self.reward_key = judging, trainer, context, reward_key
        self.every = context.config.eval_steps
        self.seen = 0  # log_history entries already read for the training reward
        self.last_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0 and not self.judging.watch.evaluations:
            self._evaluate(state, control)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self._evaluate(state, control)

    def on_train_end(self, args, state, control, **kwargs):
        if self.last_step != state.global_step:
            self._evaluate(state, control)

    def _evaluate(self, state: Any, control: Any) -> None:
        trainer = self.trainer
        rewards = [log[self.reward_key] for log in state.log_history[self.seen :] if self.reward_key in log]
        self.seen = len(state.log_history)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        reference = (lambda compute: trainer.under_reference(trainer.model, compute)) if trainer.has_reference else None
        metrics = self.judging(policy, state.global_step, sum(rewards) / len(rewards) if rewards else None,
                               reference=reference, save=saver(policy, trainer.processing_class))
        self.last_step = state.global_step
        self.context.log(metrics, state.global_step)
        state.log_history.append({**metrics, "step": state.global_step})
        self.seen = len(state.log_history)
        if self.judging.stopped_at is not None:
            control.should_training_stop = True
