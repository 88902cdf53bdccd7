"""One run's configuration: built-in defaults < YAML recipe < command-line flags.

Keys are the fields of :class:`RunConfig` plus the hyperparameters of the
chosen loss (``beta``, ``label_smoothing``, ...), all at the top level of the
recipe, as in trl's configs. An unknown key is an error that lists the valid
ones. YAML is read with ``yaml.safe_load``.
"""

from __future__ import annotations

import math

from pathlib import Path
from typing import Any, Mapping

import attrs

from molting.errors import ConfigError


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _number(kind: type):
    """A converter to int or float that accepts numeric strings (YAML reads 1e-5 as a string)."""

    def convert(value: Any) -> Any:
        if value is None or isinstance(value, bool):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if not math.isfinite(number):  # an inf learning rate turns every weight NaN at the first step
            raise ValueError(f"expected a finite number, got {value!r}")
        if kind is int:
            if not number.is_integer():
                raise ValueError(f"expected a whole number, got {value!r}")
            return int(number)
        return number

    return convert


def _fraction(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{attribute.name} must be a fraction between 0 and 1 (exclusive), got {value!r}")


def _best_metric(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    name, _, direction = str(value).partition(":")
    if not name or direction not in ("", "min", "max"):
        raise ValueError(f"{attribute.name} must be a metric name, optionally with :min or :max, got {value!r}")


def _weights(value: Any, key: str) -> dict[str, float]:
    """``{name: weight}`` from a mapping, a list of names (weight 1 each) or one name."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)):
        value = {name: 1.0 for name in value}
    if not isinstance(value, Mapping):
        raise ValueError(f"{key} must map names to weights, e.g. {{rule: 1.0}}, or list names; got {value!r}")
    weights = {}
    for name, weight in value.items():
        if isinstance(weight, bool):
            raise ValueError(f"{key}: the weight of {name!r} must be a number, got {weight!r}")
        try:
            weights[str(name)] = float(1.0 if weight is None else weight)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: the weight of {name!r} must be a number, got {weight!r}") from None
        if not math.isfinite(weights[str(name)]):
            raise ValueError(f"{key}: the weight of {name!r} must be a finite number, got {weight!r}")
    return weights


#: ``--optim`` values: PyTorch's AdamW (fused kernels, the default as in transformers, or foreach), bitsandbytes'
#: 8-bit AdamW, plain or paged.
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit")
TORCH_OPTIMIZERS = ("adamw_torch_fused", "adamw_torch")
#: ``--lr-scheduler-type`` values: transformers' schedulers (``TrainingArguments.lr_scheduler_type``).
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")
#: ``--attn-implementation`` values: transformers' attention kernels.
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def _columns(value: Any) -> dict[str, str]:
    """``{field: column}`` from a mapping or ``"chosen=response_a,rejected=response_b"``."""
    if value is None:
        return {}
    if isinstance(value, str):
        pairs = [item.partition("=") for item in value.split(",") if item.strip()]
        if any(not sep or not new.strip() or not old.strip() for new, sep, old in pairs):
            raise ValueError(f"columns must be FIELD=COLUMN[,FIELD=COLUMN...], e.g. chosen=response_a; got {value!r}")
        value = {new.strip(): old.strip() for new, _, old in pairs}
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"columns must map fields to data columns, e.g. {{chosen: response_a}}; got {value!r}")
    return {str(new): old for new, old in value.items()}


def _max_steps(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value != -1 and value <= 0:
        raise ValueError(f"max_steps must be -1 (train for --epochs) or > 0, got {value!r}")


@attrs.frozen(kw_only=True)
class RunConfig:
    """Everything a run needs to know. ``None`` means "the built-in default"."""

    plugins: tuple[str, ...] = attrs.field(converter=tuple)
    model: str | None = None
    """A local model directory or a Hugging Face hub id (``ORG/NAME``, ``ORG/NAME@REVISION``)."""
    model_revision: str | None = None
    """The hub revision of ``model``: a branch, tag or commit hash (default: the hub's main branch)."""
    data: str | None = None
    """A data file or directory, a registered dataset's name, or a Hugging Face hub dataset id (``ORG/NAME``,
    ``ORG/NAME@REVISION``)."""
    data_subset: str | None = None
    """The subset (``datasets``' configuration) of a hub dataset that has several."""
    data_split: str = "train"
    """The split of a hub dataset, or of a saved dataset directory with several, to train on."""
    columns: Mapping[str, str] = attrs.field(factory=dict, converter=_columns)
    """Fields read from other columns ({field: column}, ``chosen=response_a,rejected=response_b``)."""
    output_dir: str = "molting-output"
    max_steps: int = attrs.field(default=-1, converter=_number(int), validator=_max_steps)
    epochs: float = attrs.field(default=1.0, converter=_number(float), validator=_positive)
    learning_rate: float = attrs.field(default=5e-6, converter=_number(float), validator=_positive)
    lr_scheduler_type: str = attrs.field(default="linear", validator=attrs.validators.in_(LR_SCHEDULERS))
    warmup_steps: float = attrs.field(default=0, converter=_number(float), validator=attrs.validators.ge(0))
    """Warm-up steps; a fraction of the total steps when < 1."""
    weight_decay: float = attrs.field(default=0.0, converter=_number(float), validator=attrs.validators.ge(0))
    max_grad_norm: float = attrs.field(default=1.0, converter=_number(float), validator=attrs.validators.ge(0))
    batch_size: int = attrs.field(default=8, converter=_number(int), validator=_positive)
    gradient_accumulation_steps: int = attrs.field(default=1, converter=_number(int), validator=_positive)
    max_length: int = attrs.field(default=512, converter=_number(int), validator=attrs.validators.ge(2))
    overlong: str = attrs.field(default="truncate", validator=attrs.validators.in_(("truncate", "drop")))
    num_proc: int | None = attrs.field(default=None, converter=attrs.converters.optional(_number(int)),
                                       validator=attrs.validators.optional(_positive))
    """Processes that format and tokenize the data (``datasets``' ``map``); None: one."""
    seed: int = attrs.field(default=42, converter=_number(int))
    logging_steps: int = attrs.field(default=5, converter=_number(int), validator=_positive)
    report_to: str = attrs.field(
        default="none",
        validator=attrs.validators.in_(("none", "tensorboard", "wandb", "mlflow", "comet_ml", "trackio", "all")),
    )
    eval: str = attrs.field(
        default="auto",
        converter=lambda v: {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v,  # YAML reads off as False
        validator=attrs.validators.in_(("auto", "on", "off")),
    )
    eval_data: str | None = None
    """Held-out data for evaluation during training (a file, saved dataset, registered dataset or hub id), in the
    stage's schema: pairs for offline stages, prompts for online ones."""
    eval_data_split: str | None = None
    """The split of a hub or saved ``eval_data`` (default: ``data_split``)."""
    eval_split: float | None = attrs.field(default=None, converter=attrs.converters.optional(_number(float)),
                                           validator=attrs.validators.optional(_fraction))
    """Hold this fraction of ``data`` out for evaluation during training (shuffled with ``seed``; recorded)."""
    eval_steps: int = attrs.field(default=0, converter=_number(int), validator=attrs.validators.ge(0))
    """With held-out data: evaluate every N optimizer steps (and at the end); 0: at the end only."""
    eval_judges: Mapping[str, float] = attrs.field(factory=dict, converter=lambda v: _weights(v, "eval_judges"))
    """Judges (name → weight) of online stages' held-out answers; empty: the run's own judges. Settings in
    ``judge_args``, like the run's."""
    eval_temperature: float | None = attrs.field(default=None, converter=attrs.converters.optional(_number(float)),
                                                 validator=attrs.validators.optional(attrs.validators.ge(0)))
    """The temperature online stages sample held-out answers at (0: greedy); None: the stage's own."""
    eval_max_prompts: int = attrs.field(default=64, converter=_number(int), validator=_positive)
    """Held-out prompts an online stage samples at each evaluation (the first N)."""
    keep_best: str | None = attrs.field(default=None, validator=attrs.validators.optional(_best_metric))
    """Keep the model of the best evaluation in OUTPUT/best: a logged metric (``eval_loss``, ``eval_reward``),
    lower is better for names ending in ``loss``; ``:min``/``:max`` says so explicitly."""
    stop_on_hacking: bool = False
    """Stop training when the reward-hacking watch fires (the best model is kept with ``keep_best``)."""
    hacking_window: int = attrs.field(default=3, converter=_number(int), validator=attrs.validators.ge(2))
    """Evaluations the watch compares: training reward up while the held-out judges' score goes down over them."""
    hacking_length_factor: float = attrs.field(default=2.0, converter=_number(float), validator=_positive)
    """The watch fires when held-out answers grow past this factor of their length at the first evaluation."""
    hacking_max_kl: float | None = attrs.field(default=None, converter=attrs.converters.optional(_number(float)),
                                               validator=attrs.validators.optional(_positive))
    """The watch fires when the held-out answers' KL to the reference passes this (nats per answer); None: off."""
    trust_remote_code: bool = False
    # parameter-efficient training
    lora_r: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    """LoRA rank; 0 trains every weight."""
    lora_alpha: float = 16.0
    lora_dropout: float = attrs.field(default=0.0, validator=[attrs.validators.ge(0), attrs.validators.lt(1)])
    lora_target_modules: str = "all-linear"
    """Comma-separated module names, or all-linear."""
    load_in_4bit: bool = False
    """QLoRA: load the base model in 4-bit NF4 (bitsandbytes) and train LoRA adapters on it."""
    merge: bool = False
    """With LoRA: also write the base model with the adapter merged in."""
    dtype: str = attrs.field(default="float32",
                             validator=attrs.validators.in_(("float32", "bfloat16", "float16", "auto")))
    """The dtype the weights load in (half the memory in bfloat16; auto: the one the model's config.json names);
    with LoRA the adapters stay float32."""
    attn_implementation: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.in_(ATTENTION)))
    """The attention kernels (transformers' ``attn_implementation``); None: transformers' choice (SDPA where the
    model supports it)."""
    disable_dropout: bool | None = None
    """Set every dropout layer's probability to 0 in the model trained (GPT-2's config has 0.1); None: as trl's
    trainer for the stage does (off in the preference, unpaired, reward-model and PPO stages; kept in sft and
    grpo)."""
    gradient_checkpointing: bool = False
    """Keep only each layer's input and recompute its activations in backward (non-reentrant): less memory, ~30%
    more compute."""
    optim: str = attrs.field(default="adamw_torch_fused", validator=attrs.validators.in_(OPTIMIZERS))
    """The optimizer: PyTorch's AdamW, fused (one kernel per parameter, no parameter-sized temporaries; the default,
    as in transformers) or foreach; or bitsandbytes' 8-bit AdamW (a quarter of the optimizer state), paged on
    CUDA."""
    precision: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "fp32", "bf16")))
    """auto: bf16 autocast where it is faster (GPUs that support it; CPUs with avx512_bf16 or AMX where a timed bf16
    matrix product beats fp32 by 20%), fp32 elsewhere. The weights stay fp32 either way."""
    padding_free: bool = False
    """Pack each batch's sequences into one row without padding (position ids restart, attention stays within each)."""
    group_by_length: bool = False
    """Batch rows of similar length together (less padding on mixed-length data)."""
    logits_chunk_size: int | None = attrs.field(default=None, converter=_number(int),
                                                validator=attrs.validators.optional(attrs.validators.ge(0)))
    """Positions the output layer turns into log-probs at a time (never all tokens x vocabulary at once); None picks
    by vocabulary (about 128 MiB of float32 logits), 0 computes full logits."""
    # reference model
    precompute_ref: bool = False
    """Compute the reference log-probs once before training (cached on disk) and hold no reference model."""
    # checkpoints and robustness
    save_steps: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    """Write a checkpoint every N steps; 0: none."""
    save_total_limit: int | None = None
    resume: str | None = None
    """``auto`` (the latest checkpoint in the output dir, if any) or a checkpoint directory."""
    max_skipped_steps: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    """Stop after this many consecutive optimizer steps skipped for a non-finite loss or gradient."""
    force: bool = False
    """In a pipeline, rerun steps whose output is already complete (by default they are skipped)."""
    overwrite: bool = False
    """Replace what another run left in the output directory (by default such a directory is refused)."""
    judges: Mapping[str, float] = attrs.field(factory=dict, converter=lambda v: _weights(v, "judges"))
    """Judges (name → weight) that online stages score samples with; empty: the stage's default judges."""
    judge_args: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict, converter=dict)
    """Each judge's settings, e.g. {rule: {mode: numeric, column: answer}, python: {function: "mod:fn"}}."""
    losses: Mapping[str, float] = attrs.field(factory=dict, converter=dict)
    """Several losses of one stage and their weights ({name: weight}); empty: the plugin's own loss."""
    advantage: str | None = None
    """The advantage estimator of an online stage (``molting plugins``, kind ``advantage``); None: the stage's."""
    sampler: str = "hf"
    """How online stages draw completions (``molting plugins``, kind ``sampler``): ``hf`` (batched ``generate``),
    ``hf-paged`` (transformers' continuous batching)."""
    persona_role: str | None = None
    """Read ``data`` as conversation logs (ShareGPT, OpenAI-style messages, a ChatGPT export) and train on this
    speaker's turns (a role or a name), each with the conversation before it as the prompt
    (:mod:`molting.conversations`); ``--eval-split`` then holds out whole conversations."""
    sampler_args: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    """The sampler's settings, e.g. {base_url: http://127.0.0.1:8000/v1, model: NAME} for ``openai``."""
    judge_on_error: str = attrs.field(default="fail", validator=attrs.validators.in_(("fail", "skip", "zero")))
    """What a judgement a judge could not make does (an HTTP judge's server that kept failing): ``fail`` stops
    the run, ``skip`` leaves the sample out, ``zero`` scores it 0 (pairwise: undecided); counted as
    ``judge/NAME/failed``."""
    env: str | None = None
    """The environment (``molting plugins``, kind ``environment``) whose multi-turn episodes the online stages
    (grpo, ppo, sample-pairs) roll out instead of single answers; None: single answers."""
    env_args: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    """The environment's settings, e.g. {tool_timeout: 5}."""
    env_weight: float = attrs.field(default=1.0, converter=_number(float))
    """The weight of an episode's environment reward, summed with the judges' weighted scores."""
    max_turns: int | None = attrs.field(default=None, converter=attrs.converters.optional(_number(int)),
                                        validator=attrs.validators.optional(_positive))
    """The most model turns of an episode; None: the environment's own limit."""
    max_episode_tokens: int | None = attrs.field(default=None, converter=attrs.converters.optional(_number(int)),
                                                 validator=attrs.validators.optional(_positive))
    """The most tokens of an episode after its prompt (the model's turns and the observations); None: the stage's
    max_new_tokens times max_turns."""
    tool_parser: str = "auto"
    """How the model writes tool calls (``molting plugins``, kind ``tool_parser``: hermes, llama3-json, mistral);
    auto: the one that recognises the model's chat template."""
    loss_params: Mapping[str, Any] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self, recurse=False)
        data["plugins"] = list(self.plugins)
        data["loss_params"] = dict(self.loss_params)
        data["losses"] = dict(self.losses)
        data["judges"] = dict(self.judges)
        data["eval_judges"] = dict(self.eval_judges)
        data["columns"] = dict(self.columns)
        data["judge_args"] = {name: dict(args) for name, args in self.judge_args.items()}
        data["sampler_args"] = dict(self.sampler_args)
        data["env_args"] = dict(self.env_args)
        return data


RUN_KEYS = tuple(f.name for f in attrs.fields(RunConfig) if f.name not in ("plugins", "loss_params"))

# Settings that suit the built-in tiny model, used when no --model is given:
# the 3.5M-parameter demo model takes a larger step than a real LM, and 3 epochs of the 512 demo pairs.
DEMO_DEFAULTS: dict[str, Any] = {"learning_rate": 5e-5, "epochs": 3.0, "batch_size": 8}
# For molting's own losses (whose β is on DPO's scale): β 0.3 keeps the demo's sums as right as they were
# while the style changes (β 0.1 loses about 4 points). A third-party loss keeps its own defaults.
DEMO_LOSS_DEFAULTS: dict[str, Any] = {"beta": 0.3}


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe with the safe loader; keys may use '-' or '_'."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values, got {type(data).__name__}")
    return {normalise_key(k): v for k, v in data.items()}


def normalise_key(key: Any) -> str:
    return str(key).replace("-", "_")


def build_config(values: Mapping[str, Any], loss_param_names: tuple[str, ...], source: str) -> RunConfig:
    """Split merged ``values`` into run fields and loss hyperparameters, rejecting unknown keys."""
    run: dict[str, Any] = {}
    loss: dict[str, Any] = {}
    for key, value in values.items():
        key = normalise_key(key)
        if key in RUN_KEYS or key == "plugins":
            run[key] = value
        elif key in loss_param_names:
            loss[key] = value
        else:
            valid = sorted(set(RUN_KEYS) | set(loss_param_names) | {"plugin"})
            raise ConfigError(f"unknown config key {key!r} in {source}. Valid keys: {', '.join(valid)}")
    try:
        return RunConfig(**run, loss_params=loss)
    except (TypeError, ValueError) as exc:
        message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
        field = _unconvertible(run)
        raise ConfigError(f"invalid value in {source}: {f'{field}: ' if field else ''}{message}") from exc


def _unconvertible(run: Mapping[str, Any]) -> str | None:
    """The first key of ``run`` whose converter refuses its value (a converter's error cannot name the key)."""
    fields = attrs.fields_dict(RunConfig)
    for key, value in run.items():
        converter = getattr(fields.get(key), "converter", None)
        if converter is None:
            continue
        try:
            converter(value)
        except (TypeError, ValueError):
            return key
    return None
