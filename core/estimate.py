"""Peak memory of a run, estimated before any weight loads: ``molting estimate`` and ``molting run --dry-run``.

The model is built on PyTorch's ``meta`` device from its config.json (no
weights are read), so the parameter counts are exact: every linear layer,
the embedding, whether the output layer is tied to it. The data, when given,
is tokenized (the tokenizer is small) to find the longest batch. A process's
peak is then the sum of

- **weights**: parameters × bytes of ``--dtype`` (4-bit linear layers: ~0.5
  byte a parameter), plus LoRA adapters in float32;
- **gradients** and **optimizer**: the trainable parameters' gradient, and
  AdamW's two moments (one byte each with ``--optim adamw_8bit``);
- **reference**: a frozen copy of the weights, when the loss needs a
  reference and it is neither the LoRA base (adapter disabled) nor
  precomputed; PPO's critic as well;
- **activations**: what autograd keeps for backward, per token and layer
  (``ACTIVATION_PER_TOKEN``: about 12 hidden-sized and 3 intermediate-sized
  values, measured), for the tokens of one micro-batch; with
  ``--gradient-checkpointing`` one hidden state per layer and token plus one
  layer's full set;
- **logits**: the output layer's chunks (``molting.chunked``), or the full
  ``tokens × vocabulary`` logits with ``--logits-chunk-size 0``, and the
  transient float32 gradient of a trained output layer;
- **generation** (online stages): the KV cache of the sampled completions;
- **runtime**: the process itself with torch, transformers and trl imported
  (on CPU, measured: about 530 MB) or the CUDA context.

``tests/test_estimate.py`` holds the estimate within ±25% of the measured
peak RSS on CPU for several configurations.
"""

from __future__ import annotations

import heapq
import math
from pathlib import Path
from typing import Any, Mapping

import attrs

from molting.config import TORCH_OPTIMIZERS, RunConfig

RUNTIME_BYTES = {"cpu": 560 * 2**20, "cuda": 600 * 2**20}
"""The process before any model: Python, torch, transformers, trl and datasets imported (CPU RSS), or the CUDA
context and kernels (GPU)."""
ACTIVATION_PER_TOKEN = {"hidden": 12.0, "intermediate": 3.0}
"""Values autograd keeps per token and decoder layer, in units of the hidden and the MLP width (measured on
Qwen2- and Llama-shaped models: norms, projections' inputs, rotary q/k, SDPA's output, the gated MLP)."""
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@attrs.frozen
class Shape:
    """What the estimate needs of a model, read from its config on the meta device."""

    parameters: int
    linear: int  # parameters in the decoder's linear layers (what LoRA adapts and 4-bit quantizes)
    lora_per_rank: int  # r × (in + out) summed over the linear layers LoRA targets, per unit of rank
    vocabulary: int
    hidden: int
    intermediate: int
    layers: int
    kv_width: int  # key/value heads × head dimension
    tied: bool


@attrs.frozen
class Lengths:
    """The token counts of the longest micro-batch: its rows' longest prompt + completion, and completion."""

    sequence: int
    completion: int
    rows_per_sequence: int = 1  # sequences per data row in a forward (2 for chosen + rejected)


@attrs.frozen
class Estimate:
    parts: Mapping[str, int]
    """Bytes of each part (``weights``, ``gradients``, ...)."""
    device: str
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def table(self) -> str:
        lines = [f"{'part':<14}{'GB':>8}"]
        lines += [f"{name:<14}{value / 1e9:>8.2f}" for name, value in self.parts.items() if value]
        lines.append(f"{'peak':<14}{self.total / 1e9:>8.2f}  per process, {self.device}")
        return "\n".join(lines + list(self.notes))


# --------------------------------------------------------------------------- the model's shape


def model_shape(path: str | Path, lora_targets: str = "all-linear", trust_remote_code: bool = False) -> Shape:
    """Parameter counts of the causal LM in ``path``, built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    targets = None if lora_targets == "all-linear" else {t.strip() for t in lora_targets.split(",") if t.strip()}
    linear = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            linear += module.weight.numel()
            if targets is None or name.rsplit(".", 1)[-1] in targets:
                lora += module.in_features + module.out_features
    text = config.get_text_config()
    heads = getattr(text, "num_attention_heads", 1)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return Shape(
        parameters=sum(p.numel() for p in model.parameters()), linear=linear, lora_per_rank=lora,
        vocabulary=head.weight.size(0), hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size), layers=text.num_hidden_layers,
        kv_width=getattr(text, "num_key_value_heads", heads) * head_dim,
        tied=head.weight is model.get_input_embeddings().weight,
    )


# --------------------------------------------------------------------------- the estimate


def estimate(shape: Shape, config: RunConfig, lengths: Lengths, stage: str, needs_reference: bool,
             stage_params: Any = None, device: str = "cpu", trains: bool = True) -> Estimate:
    """The peak memory of one process of a run of ``stage`` (see the module docstring for each part).

    ``trains=False``: a stage that only samples and scores (one that
    produces a dataset): no gradients, optimizer or kept activations.
    """
    weight_bytes = _weights(shape, config)
    trainable = (shape.lora_per_rank * config.lora_r if config.lora_r else shape.parameters) if trains else 0
    trained_bytes = 4 if config.lora_r else BYTES[config.dtype]
    state_bytes = trained_bytes if config.optim in TORCH_OPTIMIZERS else 1
    reference = 0
    if stage == "ppo" or (needs_reference and not config.lora_r and not config.precompute_ref):
        reference = shape.parameters * BYTES[config.dtype]
    critic = 0
    if stage == "ppo":  # a second model, trained: weights, gradients and moments
        critic = shape.parameters * (BYTES[config.dtype] + trained_bytes + 2 * state_bytes)
    tokens = _tokens(config, lengths, stage, stage_params)
    parts = {
        "runtime": RUNTIME_BYTES[device],
        "weights": weight_bytes,
        "gradients": trainable * trained_bytes,
        "optimizer": 2 * trainable * state_bytes + _eight_bit_on_cpu(shape, config, device, trains),
        "reference": reference + critic,
        "activations": _activations(shape, config, tokens if trains else tokens // shape.layers, device),
        "logits": 0 if stage == "reward-model" else _logits(shape, config, tokens, lengths,
                                                            trains and not config.lora_r),
        "generation": _kv_cache(shape, config, lengths, stage, stage_params),
    }
    notes = () if device == "cpu" else ("(GPU: the caching allocator adds ~10% over this)",)
    return Estimate(parts, device, notes)


def _eight_bit_on_cpu(shape: Shape, config: RunConfig, device: str, trains: bool) -> int:
    """bitsandbytes' 8-bit AdamW on CPU (no fused kernel) updates a parameter through float32 copies of its two
    moments, and of its weight and gradient when those are 16-bit: measured, 8 and 20 bytes a value of the largest
    parameter (the embedding)."""
    if device != "cpu" or config.optim in TORCH_OPTIMIZERS or not trains or config.lora_r:
        return 0
    return shape.vocabulary * shape.hidden * (8 if config.dtype == "float32" else 20)


def _weights(shape: Shape, config: RunConfig) -> int:
    adapters = shape.lora_per_rank * config.lora_r * 4 if config.lora_r else 0
    if config.load_in_4bit:  # NF4 linear layers: half a byte a weight plus a float32 scale per 64 of them
        return int(shape.linear * (0.5 + 4 / 64)) + (shape.parameters - shape.linear) * 4 + adapters
    return shape.parameters * BYTES[config.dtype] + adapters


def _tokens(config: RunConfig, lengths: Lengths, stage: str, stage_params: Any) -> int:
    """Tokens of the micro-batch whose activations autograd keeps."""
    if stage in ("grpo", "ppo", "sample-pairs", "online-dpo"):
        new = getattr(stage_params, "max_new_tokens", lengths.completion)
        sequence = min(config.max_length, lengths.sequence - lengths.completion + new)
        return config.batch_size * sequence * lengths.rows_per_sequence
    return config.batch_size * lengths.sequence * lengths.rows_per_sequence


def _autocast(config: RunConfig, device: str) -> bool:
    """Whether the run trains under bf16 autocast: on this machine, the run's own choice
    (:func:`molting.training.uses_bf16`); for a GPU estimated from elsewhere, ``auto`` means bf16."""
    import torch

    from molting.training import uses_bf16

    if config.precision != "auto" or device == ("cuda" if torch.cuda.is_available() else "cpu"):
        return uses_bf16(config.precision)
    return device == "cuda"


def _activations(shape: Shape, config: RunConfig, tokens: int, device: str) -> int:
    size = 2 if config.dtype != "float32" or _autocast(config, device) else 4
    per_layer = ACTIVATION_PER_TOKEN["hidden"] * shape.hidden + ACTIVATION_PER_TOKEN["intermediate"] * shape.intermediate
    if config.gradient_checkpointing:  # each layer's input kept, one layer recomputed at a time
        return int(tokens * size * (shape.layers * shape.hidden + per_layer))
    return int(tokens * size * shape.layers * per_layer)


def _logits(shape: Shape, config: RunConfig, tokens: int, lengths: Lengths, trainable_head: bool) -> int:
    from molting.chunked import default_chunk_size

    scored = min(tokens, config.batch_size * lengths.rows_per_sequence * lengths.completion) or tokens
    if config.logits_chunk_size == 0:  # full logits: the float32 logits, their log-softmax and its gradient
        return 3 * scored * shape.vocabulary * 4
    chunk = config.logits_chunk_size or default_chunk_size(shape.vocabulary)
    head_gradient = shape.vocabulary * shape.hidden * 4 if trainable_head else 0  # float32, while backward runs
    return 3 * min(chunk, scored) * shape.vocabulary * 4 + head_gradient + scored * shape.hidden * 4


def _kv_cache(shape: Shape, config: RunConfig, lengths: Lengths, stage: str, stage_params: Any) -> int:
    if stage not in ("grpo", "ppo", "sample-pairs", "online-dpo"):
        return 0
    new = getattr(stage_params, "max_new_tokens", lengths.completion)
    sequences = config.batch_size * (getattr(stage_params, "num_samples", 1) if stage == "sample-pairs" else 1)
    return sequences * (lengths.sequence + new) * shape.layers * 2 * shape.kv_width * BYTES[config.dtype]


# --------------------------------------------------------------------------- the data's lengths


def data_lengths(rows: Any, tokenizer: Any, config: RunConfig, stage: str) -> Lengths:
    """The longest micro-batch of ``rows``: the ``batch_size`` longest rows' longest sequence and completion.

    Only the rows longest in characters are tokenized (the longest in tokens
    are among them; a million rows would take minutes). No rows (an earlier
    step makes them): ``--max-length``, half of it completion.
    """
    from molting.data import first_row, iter_rows

    keys = [k for k in ("chosen", "rejected", "completion") if len(rows) and k in first_row(rows)]
    pairs = 2 if {"chosen", "rejected"} <= set(keys) and stage in ("preference", "reward-model") else 1
    if not len(rows):
        pairs = 2 if stage in ("preference", "reward-model") else 1
        return Lengths(config.max_length, config.max_length // 2, pairs)

    def text(value: Any) -> str:  # a message list: its contents, as a bound
        return " ".join(str(m.get("content", "")) for m in value) if isinstance(value, list) else str(value)

    def count(value: Any) -> int:
        return len(tokenizer(text(value), add_special_tokens=False, verbose=False)["input_ids"]) + 1

    def sizes(row: dict[str, Any]) -> tuple[int, int]:
        if "messages" in row:
            return count(row["messages"]), count(row["messages"][-1:])
        completion = max([count(row[k]) for k in keys] or [0])
        return count(row.get("prompt", "")) + completion, completion

    def characters(row: dict[str, Any]) -> int:
        return sum(len(text(value)) for value in row.values())

    candidates = heapq.nlargest(max(64, 8 * config.batch_size), iter_rows(rows), key=characters)
    longest = sorted(map(sizes, candidates), reverse=True)[: config.batch_size]
    sequence = min(config.max_length, max(s for s, _ in longest))
    return Lengths(sequence, min(sequence, max(c for _, c in longest)), pairs)


def parse_size(text: str) -> int:
    """``24GB``, ``512MB``, ``1.5 GiB`` → bytes."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"expected a size such as 24GB or 512MB, got {text!r}")
    number, unit, binary = match.groups()
    power = " KMGT".index(unit.upper() or " ")
    return int(float(number) * (1024 if binary else 1000) ** power)


def gigabytes(value: int) -> str:
    return f"{value / 1e9:.2f} GB" if not math.isnan(value) else "?"


@attrs.frozen
class StepFacts:
    """What the estimate of a step reads once: its model's shape, its data's lengths, what the stage needs."""

    shape: Shape
    lengths: Lengths
    stage: str
    needs_reference: bool
    stage_params: Any
    device: str
    trains: bool = True

    def estimate(self, config: RunConfig) -> Estimate:
        """The estimate under ``config`` (the step's settings, or changed ones: the same model and data)."""
        result = estimate(self.shape, config, self.lengths, self.stage, self.needs_reference, self.stage_params,
                          self.device, self.trains)
        size = f"{self.shape.parameters / 1e6:,.0f}M parameters, vocabulary {self.shape.vocabulary:,}"
        batch = (f"micro-batch {config.batch_size} x {self.lengths.rows_per_sequence} x {self.lengths.sequence} "
                 f"tokens, {self.lengths.completion} of them completion")
        return attrs.evolve(result, notes=(f"({size}; {batch})", *result.notes))


def step_facts(config: RunConfig, step: Any, host: Any, device: str | None = None,
               rows: list[dict[str, Any]] | None = None) -> StepFacts:
    """Read what the estimate of one resolved step of ``molting run`` needs: the model's config.json and
    tokenizer (never its weights) and the data's lengths.

    ``rows`` are the step's data (read from ``config.data`` when not given;
    ``[]`` when an earlier step makes them: then the lengths are
    ``--max-length``'s).
    """
    import torch

    from molting.models import load_tokenizer, resolve_model_path
    from molting.pipeline import load_rows
    from molting.resolve import make_stage_params

    path = resolve_model_path(config.model, config.model_revision, trust_remote_code=config.trust_remote_code,
                              weights=False)  # config.json and the tokenizer are enough
    shape = model_shape(path, config.lora_target_modules, config.trust_remote_code)
    if rows is None:
        rows, _ = load_rows(host, step, config.data, config=config)
    lengths = data_lengths(rows, load_tokenizer(path, config.trust_remote_code), config, step.stage.name)
    stage_params = make_stage_params(step, config)
    needs_reference = step.loss is not None and step.loss.needs_reference
    if step.stage.name == "grpo":
        needs_reference = getattr(stage_params, "beta", 0) > 0
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    trains = step.stage.produces != "dataset"
    return StepFacts(shape, lengths, step.stage.name, needs_reference, stage_params, device, trains)


def estimate_run(config: RunConfig, step: Any, host: Any, device: str | None = None) -> Estimate:
    """The estimate of one resolved step of ``molting run`` (see :func:`step_facts`)."""
    config = with_concrete_dtype(config)
    return step_facts(config, step, host, device).estimate(config)


def with_concrete_dtype(config: RunConfig) -> RunConfig:
    """``config`` with ``--dtype auto`` replaced by the dtype the model's config.json names."""
    if config.dtype != "auto":
        return config
    from molting.models import config_dtype, resolve_model_path

    path = resolve_model_path(config.model, config.model_revision, trust_remote_code=config.trust_remote_code,
                              weights=False)
    return attrs.evolve(config, dtype=config_dtype(path))


def dry_run(config: RunConfig, steps: list[Any], host: Any, budget: int | None = None,
            device: str | None = None) -> tuple[str, bool]:
    """What ``molting run --dry-run`` prints for each step, and whether every step fits ``budget`` bytes.

    A later step's data is read as the run would (its own ``data:``, else its
    stage's default); data an earlier step makes is not there yet, so its
    lengths are ``--max-length``'s. Every step is estimated on the run's
    model: a pipeline's steps keep its architecture.
    """
    from molting.pipeline import load_rows

    blocks, all_fit = [], True
    makes_data = False
    for index, step in enumerate(steps):
        step_config = with_concrete_dtype(attrs.evolve(step.config or config, model=config.model))
        own = step_config.data if step_config.data != config.data or index == 0 else None
        rows = [] if own is None and makes_data else load_rows(host, step, own, config=step_config)[0]
        facts = step_facts(step_config, step, host, device, rows=rows)
        result = facts.estimate(step_config)
        lines = [f"step {index + 1}: {step.name} (stage {step.stage.name})", result.table()]
        if not rows:
            lines.append("(its data is made by an earlier step: every row taken as --max-length tokens)")
        if budget is not None:
            verdict, fit = _verdict(budget, result, step_config, facts)
            all_fit &= fit
            lines.append(verdict)
        blocks.append("\n".join(lines))
        makes_data = makes_data or step.stage.produces == "dataset"
    return "\n\n".join(blocks), all_fit


def _verdict(budget: int, result: Estimate, config: RunConfig, facts: StepFacts) -> tuple[str, bool]:
    if result.total <= budget:
        return f"fits in {gigabytes(budget)} ({gigabytes(budget - result.total)} to spare)", True
    found = _fitting(budget, config, facts)
    if not found:
        return (f"does not fit in {gigabytes(budget)}, and no setting molting knows brings it under; "
                "a smaller --max-length or model would"), False
    labels, fitted = found
    return f"does not fit in {gigabytes(budget)}; with {labels}: {gigabytes(fitted.total)}", False


def _fitting(budget: int, config: RunConfig, facts: StepFacts) -> tuple[str, Estimate] | None:
    """The :data:`LEVERS` that bring the estimate under ``budget``, taken in order and each kept only where it
    lowers the estimate; then smaller micro-batches at the same effective batch."""
    changes: dict[str, Any] = {}
    labels: list[str] = []
    best = facts.estimate(config)
    for label, change in LEVERS:
        result = facts.estimate(attrs.evolve(config, **{**changes, **change}))
        if result.total < best.total:
            changes, best = {**changes, **change}, result
            labels.append(label)
            if result.total <= budget:
                return " ".join(labels), result
    batch = config.batch_size
    while batch > 1:
        batch //= 2
        accumulation = config.gradient_accumulation_steps * config.batch_size // batch
        result = facts.estimate(attrs.evolve(config, **{**changes, "batch_size": batch,
                                                        "gradient_accumulation_steps": accumulation}))
        if result.total <= budget:
            return " ".join([*labels, f"--batch-size {batch} --gradient-accumulation-steps {accumulation}"]), result
    return None


LEVERS = (
    ("--dtype bfloat16", {"dtype": "bfloat16"}),
    ("--gradient-checkpointing", {"gradient_checkpointing": True}),
    ("--optim adamw_8bit", {"optim": "adamw_8bit"}),
    ("--precompute-ref", {"precompute_ref": True}),
    ("--lora-r 16", {"lora_r": 16}),
    ("--load-in-4bit", {"lora_r": 16, "load_in_4bit": True}),
)
"""The settings that cut memory, cheapest to the result first: ``molting run --dry-run --memory-budget`` tries them
in this order, each on top of the ones before."""
