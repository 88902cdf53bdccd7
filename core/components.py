"""The kinds of component a plugin can register, and what losses and advantage estimators exchange.

Components are small frozen attrs classes: a name, a one-line description
and the callables that do the work. Building one imports nothing heavy, so a
plugin module stays cheap to load; its callables import torch when they run.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, Mapping

import attrs

if TYPE_CHECKING:  # pragma: no cover - typing only
    from molting.context import StageContext

KINDS = ("stage", "loss", "judge", "dataset", "advantage", "sampler", "environment", "tool_parser")
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*\+*$")  # a trailing "+" or two: reinforce++


def _check_name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise ValueError(
            f"{type(instance).__name__} name {value!r} is not well formed: use lower-case letters, "
            "digits, '-' or '_', starting with a letter, perhaps ending in '+' (e.g. 'dpo', 'sigmoid-norm')"
        )


def _check_description(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{type(instance).__name__} {instance.name!r} needs a one-line description")


def _check_params(instance: Any, attribute: attrs.Attribute, value: type) -> None:
    if not attrs.has(value):
        raise TypeError(f"{type(instance).__name__} {instance.name!r}: params must be an attrs class, got {value!r}")


@attrs.frozen
class NoParams:
    """Hyperparameters of a component that has none."""


@attrs.frozen
class Loss:
    """A loss: a pure function from the quantities its stage computes to per-example losses.

    ``compute(inputs, params)`` receives the stage's inputs (for the
    ``preference`` stage a :class:`PreferenceInputs`) and an instance of
    ``params``; it returns a :class:`LossOutput`. It never touches a model.
    """

    name: str = attrs.field(validator=_check_name)
    compute: Callable[[Any, Any], LossOutput]
    description: str = attrs.field(validator=_check_description)
    params: type = attrs.field(default=NoParams, validator=_check_params)
    stage: str = "preference"
    needs_reference: bool = True


PRODUCES = ("policy", "reward-model", "dataset")


@attrs.frozen
class Stage:
    """A training phase: the data it reads, the models it holds and the step.

    ``run(context)`` trains and saves to ``context.output_dir``; it receives a
    :class:`molting.StageContext` and returns the final metrics (a dict).
    ``columns`` names the data columns the stage needs; ``default_loss`` is the
    loss used when the stage is asked for by name; ``default_data`` the
    registered dataset it trains on when no ``--data`` is given; ``metrics``
    lists the metric names it logs.

    ``params`` is an attrs class of the stage's own settings (PPO's γ and λ,
    the number of samples per prompt, ...), set like loss hyperparameters:
    top-level recipe keys or ``--set``. ``produces`` says what the output
    directory holds, which is how a pipeline wires one stage to the next:
    a ``policy`` (a causal LM: the next stage's model), a ``reward-model``
    (a sequence classifier: the default model of the ``reward-model`` judge
    later in the run) or a ``dataset`` (``context.output_dir / "data.jsonl"``:
    the next stage's data). ``demo_defaults`` are run settings (learning
    rate, epochs, ...) that suit the built-in tiny model, applied when no
    ``--model`` is given, below the recipe and the flags.
    """

    name: str = attrs.field(validator=_check_name)
    run: Callable[[StageContext], Mapping[str, Any]]
    description: str = attrs.field(validator=_check_description)
    columns: tuple[str, ...] = ()
    default_loss: str | None = None
    default_data: str | None = None
    metrics: tuple[str, ...] = ()
    params: type = attrs.field(default=NoParams, validator=_check_params)
    produces: str = attrs.field(default="policy", validator=attrs.validators.in_(PRODUCES))
    demo_defaults: Mapping[str, Any] = attrs.field(factory=dict)
    default_judges: Mapping[str, float] = attrs.field(factory=dict)
    """Judges (name → weight) an online stage scores with when the run names none."""
    default_advantage: str | None = None
    """The advantage estimator (``molting plugins``, kind ``advantage``) the stage uses unless ``--advantage``
    names another; ``None``: the stage takes none."""
    environments: bool = False
    """Whether the stage rolls out multi-turn episodes of an environment (``--env NAME``); ``False``: the run refuses
    ``--env`` for it."""
    inputs: type | None = None
    """The class of what the stage hands its loss (:class:`PreferenceInputs`, ...); ``None`` for a stage
    without a loss plugin. A loss of another stage with the same inputs runs here too (``--loss NAME=1``), and
    the conformance suite generates example inputs of this class for the stage's losses."""


@attrs.frozen
class Judge:
    """Scores completions (``pointwise``) or picks the better of two (``pairwise``).

    ``score(prompts, completions, params)`` returns one float per completion
    for a pointwise judge; for a pairwise judge ``completions`` is a list of
    pairs and the result one index (0, 1, or -1 when undecided) per pair.
    A judgement the judge could not make (a server that kept failing) is a
    :class:`molting.judging.Failed` in its place; the run's
    ``judge_on_error`` decides what it does.
    A ``score`` that also takes ``**columns`` receives the data's other
    columns, one list per column aligned with ``prompts`` (a reference
    ``answer``, say), as trl passes dataset columns to reward functions.
    Callers go through :class:`molting.judging.Scorer`, which caches
    deterministic judges' scores and turns an exception, a wrong count or a
    NaN into an error naming the judge and the prompt.
    """

    name: str = attrs.field(validator=_check_name)
    score: Callable[..., list[float]]
    description: str = attrs.field(validator=_check_description)
    kind: str = attrs.field(default="pointwise", validator=attrs.validators.in_(("pointwise", "pairwise")))
    params: type = attrs.field(default=NoParams, validator=_check_params)
    deterministic: bool = True
    example: Callable[[Any], Mapping[str, Any]] | None = None
    """For the conformance checks: given a scratch directory, settings (as ``judge_args``) that let the
    judge score the demo prompts, e.g. a model directory it writes there; ``None``: the defaults do."""
    stats: Callable[[Any], Mapping[str, float]] | None = None
    """Given the settings, the judge's own counters so far (an HTTP judge's requests, retries, latency),
    logged by the stages as ``judge/NAME/KEY`` (:meth:`molting.judging.Scorer.metrics`)."""


@attrs.frozen
class Dataset:
    """A named source of rows: ``load(split)`` returns a list of dicts.

    ``splits`` names the splits it can load; ``columns`` the columns every row
    has. ``molting run --data NAME`` uses it.
    """

    name: str = attrs.field(validator=_check_name)
    load: Callable[[str], list[dict[str, Any]]]
    description: str = attrs.field(validator=_check_description)
    splits: tuple[str, ...] = ("train",)
    columns: tuple[str, ...] = ()
    demo: bool = False
    """Rows of the built-in demo task: a run on them (or on data an earlier step made from them) is evaluated on
    the task's held-out split, and stages may apply demo-only settings (:attr:`molting.DataSource.demo`)."""


NEEDS = ("values", "token_rewards", "reference", "greedy")
"""What an advantage estimator may need beyond rewards, groups and the mask (:attr:`Advantage.needs`)."""


def _check_needs(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if callable(value):
        return
    unknown = [need for need in value if need not in NEEDS]
    if not isinstance(value, tuple) or unknown:
        raise ValueError(f"Advantage {instance.name!r}: needs must be a tuple of {', '.join(NEEDS)} (or a callable "
                         f"of the params returning one), got {value!r}")


@attrs.frozen
class Advantage:
    """An advantage estimator: a pure function from rewards, group ids and masks to advantages.

    ``compute(inputs, params)`` receives an :class:`AdvantageInputs` and an
    instance of ``params`` and returns an :class:`AdvantageOutput`. ``needs``
    names what it reads beyond ``rewards``, ``groups`` and ``mask`` (see
    :data:`NEEDS`): the critic's ``values``, the stage's per-token
    ``token_rewards``, the per-token log-ratio to the ``reference`` (``kl``)
    or the reward of each prompt's ``greedy`` completion (``baselines``); a
    callable of the params when that depends on them (REINFORCE++ needs the
    reference only with a KL coefficient). ``stages`` lists the stages that
    can provide what it needs.
    """

    name: str = attrs.field(validator=_check_name)
    compute: Callable[[Any, Any], Any]
    description: str = attrs.field(validator=_check_description)
    params: type = attrs.field(default=NoParams, validator=_check_params)
    needs: Any = attrs.field(default=(), validator=_check_needs)
    stages: tuple[str, ...] = ("grpo",)

    def requirements(self, params: Any) -> tuple[str, ...]:
        """What this estimator needs with these hyperparameters."""
        return tuple(self.needs(params)) if callable(self.needs) else self.needs


@attrs.frozen
class Sampler:
    """How an online stage draws completions: ``sample(request)`` returns a :class:`molting.sampling.Samples`.

    ``request`` is a :class:`molting.sampling.SamplingRequest` (the policy, its
    tokenizer, the prompts, ``n`` per prompt and the decoding settings). A
    sampler must honour temperature 0 as greedy decoding (the conformance
    suite compares its greedy completions with the ``hf`` sampler's) and say
    whether it draws from each completion's own random stream
    (``per_completion_seeds``: what makes several processes follow one).
    ``available()`` says, as a message, why it cannot run here (``None``: it can).
    """

    name: str = attrs.field(validator=_check_name)
    sample: Callable[[Any], Any]
    description: str = attrs.field(validator=_check_description)
    per_completion_seeds: bool = False
    available: Callable[[], str | None] = lambda: None
    params: type = attrs.field(default=NoParams, validator=_check_params)
    """Its settings (``sampler_args`` in a recipe, ``--sampler-arg KEY=VALUE``), given as ``request.settings``."""
    follows_policy: bool = True
    """Whether it draws from the model it is handed. One that does not (a served model, ``openai``) can feed
    one-shot sampling before offline training (``sample-pairs``), never a stage that trains on its samples."""
    example: Callable[[Any], Mapping[str, Any]] | None = None
    """For the conformance checks: given a scratch directory, settings (as ``sampler_args``) under which it
    samples from the built-in demo model, e.g. a server it starts; ``None``: the defaults do."""


def _at_least_one(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{type(instance).__name__} {instance.name!r}: {attribute.name} must be a whole number >= 1, "
                         f"got {value!r}")


@attrs.frozen
class Environment:
    """A multi-turn environment: episodes the online stages roll out (``--env NAME``) instead of single answers.

    ``start(row, seed, params)`` begins an episode from a data row and a seed
    and returns a :class:`molting.environments.Episode` (or an awaitable of
    one): the messages the model sees first, the tools it may call, and
    ``step(turn)``, which takes the model's turn (a
    :class:`molting.environments.ModelTurn`: its text and the tool calls
    parsed from it) and answers with a :class:`molting.environments.Turn`:
    the next observation (messages), a reward, and whether the episode is
    done. ``step`` may be a coroutine. An episode that is not done after
    ``max_turns`` model turns (the run's ``max_turns`` overrides it) ends
    truncated. The same row and seed must start the same episode.
    ``default_data`` is the registered dataset a run with this environment
    trains on when no ``--data`` is given (its ``test`` split, if it has
    one, is the held-out set a run evaluates episodes on before and after).
    """

    name: str = attrs.field(validator=_check_name)
    start: Callable[[Mapping[str, Any], int, Any], Any]
    description: str = attrs.field(validator=_check_description)
    params: type = attrs.field(default=NoParams, validator=_check_params)
    """Its settings (``env_args`` in a recipe, ``--env-arg KEY=VALUE``), given to ``start``."""
    max_turns: int = attrs.field(default=4, validator=_at_least_one)
    default_data: str | None = None
    example: Callable[[Any], Mapping[str, Any]] | None = None
    """For the conformance checks: given a scratch directory, settings (as ``env_args``) under which episodes
    start from the rows of ``default_data`` (or of ``example_rows``); ``None``: the defaults do."""
    example_rows: Callable[[], list[dict[str, Any]]] | None = None
    """For the conformance checks: a few data rows to start episodes from, when ``default_data`` names none."""


@attrs.frozen
class ToolParser:
    """How one family of models writes tool calls: ``parse(text)`` finds them in a model's turn.

    ``parse`` returns a :class:`molting.tools.ParsedTurn` (the text without
    the calls, the calls, and a reason for each call that did not parse); it
    never raises on what a model wrote. ``render(calls)`` writes calls as the
    family does (the conformance suite parses what it renders).
    ``recognises(chat_template)`` says whether a chat template writes this
    format, which is how ``--tool-parser auto`` picks the parser.
    """

    name: str = attrs.field(validator=_check_name)
    parse: Callable[[str], Any]
    render: Callable[[Any], str]
    description: str = attrs.field(validator=_check_description)
    recognises: Callable[[str], bool] = lambda template: False


COMPONENT_TYPES: dict[str, type] = {"stage": Stage, "loss": Loss, "judge": Judge, "dataset": Dataset,
                                    "advantage": Advantage, "sampler": Sampler, "environment": Environment,
                                    "tool_parser": ToolParser}


# --------------------------------------------------------------------------- loss inputs and outputs


@attrs.frozen
class PreferenceInputs:
    """What the ``preference`` stage hands a loss, one entry per pair (shape ``(batch,)``).

    Log-probabilities are summed over completion tokens. ``ref_*`` are ``None``
    for a loss with ``needs_reference=False``. ``chosen_lengths`` and
    ``rejected_lengths`` count completion tokens. ``chosen_token_logps`` and
    ``chosen_mask`` (shape ``(batch, tokens)``) are the policy's per-token
    log-probs of the chosen completion, for losses that add an NLL term.
    """

    chosen_logps: Any
    rejected_logps: Any
    ref_chosen_logps: Any = None
    ref_rejected_logps: Any = None
    chosen_lengths: Any = None
    rejected_lengths: Any = None
    chosen_token_logps: Any = None
    chosen_mask: Any = None


@attrs.frozen
class UnpairedInputs:
    """What the ``unpaired`` stage hands a loss (KTO and its kin), one entry per example (shape ``(batch,)``).

    Each example is a prompt and one completion, labelled desirable (``True``)
    or undesirable (``False``). ``logps`` / ``ref_logps`` are the policy's and
    the frozen reference's log-probs of the completion, summed over its tokens
    (``ref_logps`` is ``None`` for a loss with ``needs_reference=False``).
    ``labels`` is a bool tensor. ``kl`` is a scalar tensor: the batch estimate
    of KL(policy ‖ reference) from mismatched prompt/completion pairs, detached,
    averaged across processes and clamped at 0, as trl's KTOTrainer computes
    it (``None`` without a reference). ``lengths`` counts completion tokens.
    """

    logps: Any
    labels: Any
    ref_logps: Any = None
    kl: Any = None
    lengths: Any = None


@attrs.frozen
class LossOutput:
    """What a loss returns.

    ``losses`` has one value per example (the stage averages them);
    ``chosen_rewards`` / ``rejected_rewards`` are the implicit rewards the
    stage logs as ``rewards/*`` (detached by the stage); ``metrics`` holds any
    extra scalars to log under the loss's own names.
    """

    losses: Any
    chosen_rewards: Any = None
    rejected_rewards: Any = None
    metrics: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class RewardInputs:
    """What the ``reward-model`` stage hands a loss, one entry per pair (shape ``(batch,)``).

    ``chosen_rewards`` / ``rejected_rewards`` are the reward model's scalar
    outputs for the two completions; ``margin`` is the row's ``margin`` column
    (how much better chosen is) or ``None`` when the data has none.
    """

    chosen_rewards: Any
    rejected_rewards: Any
    margin: Any = None


@attrs.frozen
class GroupInputs:
    """What the ``grpo`` stage hands a loss: per-token tensors of sampled completions, shape ``(batch, tokens)``.

    ``logps`` are the policy's per-token log-probs of the completions (with
    gradients), ``old_logps`` those of the policy that sampled them
    (detached; equal to ``logps.detach()`` when each generation batch is used
    for one optimisation step), ``ref_logps`` the reference's (``None`` when
    β = 0 and no reference is loaded). ``advantages`` has one value per
    completion (shape ``(batch,)``); ``mask`` is 1 on the completion tokens
    that count (0 on padding, and on truncated completions when they are
    masked). ``max_completion_length`` (Dr. GRPO's constant normaliser),
    ``num_items_in_batch`` (the counted completion tokens of the whole
    generation batch on every process, DAPO's normaliser),
    ``num_processes`` and ``steps_per_generation`` (micro-batches per
    generation batch on each process) let a loss normalise as trl's variants do.
    ``entropy_mask`` (``(batch, tokens)``, 1 on the tokens that train; ``None``
    when all do) is the stage's ``top_entropy_quantile`` selection: it
    multiplies the policy term, not the KL term, and the normaliser still
    counts every completion token (trl's rule; :func:`molting.group_losses.finish`
    applies it).

    The loss returns one value per completion (``LossOutput.losses``, shape
    ``(batch,)``) whose *mean* is the micro-batch's loss; the trainer then
    divides by the gradient accumulation steps, as for every stage. A
    token-normalised loss therefore puts on row i its masked token sum times
    ``batch`` over its normaliser. ``LossOutput.metrics`` values of shape
    ``(batch, tokens)`` are averaged over the completion tokens of every
    process (trl's ``clip_ratio/*`` and ``kl``); scalars are averaged across
    processes.
    """

    logps: Any
    old_logps: Any
    advantages: Any
    mask: Any
    ref_logps: Any = None
    max_completion_length: int | None = None
    num_items_in_batch: Any = None
    num_processes: int = 1
    steps_per_generation: int = 1
    entropy_mask: Any = None


# --------------------------------------------------------------------------- advantage estimators' inputs and outputs


@attrs.frozen
class AdvantageInputs:
    """What an online stage hands an advantage estimator: one generation batch, every process's rows.

    ``rewards`` ``(N,)`` is each completion's weighted judge reward;
    ``groups`` ``(N,)`` (long) gives completions of the same prompt the same
    id (GRPO's groups of G; each completion its own in PPO); ``mask``
    ``(N, T)`` is 1 on the completion tokens. The others are ``None`` unless
    the estimator :attr:`~Advantage.needs` them: ``values`` ``(N, T)``, the
    critic's value of each token (PPO); ``token_rewards`` ``(N, T)``, the
    stage's shaped per-token rewards (PPO: the score on the last token minus
    ``kl_coef``·KL); ``kl`` ``(N, T)``, log π_old − log π_ref per token
    (masked); ``baselines`` ``(N,)``, the reward of the greedy completion of
    each row's prompt (ReMax).
    """

    rewards: Any
    groups: Any
    mask: Any
    values: Any = None
    token_rewards: Any = None
    kl: Any = None
    baselines: Any = None


@attrs.frozen
class AdvantageOutput:
    """What an estimator returns: ``advantages`` ``(N,)`` (one per completion) or ``(N, T)`` (per token), zero
    off the mask; ``returns`` ``(N, T)`` the value targets (PPO's critic; ``None`` otherwise); ``metrics``
    scalars logged under their names."""

    advantages: Any
    returns: Any = None
    metrics: Mapping[str, Any] = attrs.field(factory=dict)
