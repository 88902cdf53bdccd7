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

import math
from pathlib import Path
from typing import Any, Mapping

import attrs

from molting.config import RunConfig

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
             stage_params: Any = None, device: str = "cpu") -> Estimate:
    """The peak memory of one process of a run of ``stage`` (see the module docstring for each part)."""
    weight_bytes = _weights(shape, config)
    trainable = shape.lora_per_rank * config.lora_r if config.lora_r else shape.parameters
    trained_bytes = 4 if config.lora_r else BYTES[config.dtype]
    state_bytes = 1 if config.optim != "adamw_torch" else trained_bytes
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
        "optimizer": 2 * trainable * state_bytes,
        "reference": reference + critic,
        "activations": _activations(shape, config, tokens),
        "logits": _logits(shape, config, tokens, lengths, trainable_head=not config.lora_r),
        "generation": _kv_cache(shape, config, lengths, stage, stage_params),
    }
    notes = () if device == "cpu" else ("(GPU: the caching allocator adds ~10% over this)",)
    return Estimate(parts, device, notes)


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


def _activations(shape: Shape, config: RunConfig, tokens: int) -> int:
    size = 2 if config.dtype != "float32" or config.precision == "bf16" else 4
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


def data_lengths(rows: list[dict[str, Any]], tokenizer: Any, config: RunConfig, stage: str) -> Lengths:
    """The longest micro-batch of ``rows``: the ``batch_size`` longest rows' longest sequence and completion."""
    keys = [k for k in ("chosen", "rejected", "completion") if rows and k in rows[0]]
    pairs = 2 if {"chosen", "rejected"} <= set(keys) and stage in ("preference", "reward-model") else 1

    def count(value: Any) -> int:
        if not isinstance(value, str):  # a message list: its contents, as a bound
            value = " ".join(str(m.get("content", "")) for m in value) if isinstance(value, list) else str(value)
        return len(tokenizer(value, add_special_tokens=False)["input_ids"]) + 1

    if "messages" in (rows[0] if rows else {}):
        sizes = [(count(r["messages"]), count(r["messages"][-1:])) for r in rows]
    else:
        sizes = [(count(r.get("prompt", "")) + max([count(r[k]) for k in keys] or [0]),
                  max([count(r[k]) for k in keys] or [0])) for r in rows]
    longest = sorted(sizes, reverse=True)[: config.batch_size] or [(config.max_length, config.max_length // 2)]
    sequence = min(config.max_length, max(s for s, _ in longest))
    return Lengths(sequence, min(sequence, max(c for _, c in longest)), pairs)


def fits(budget: int, shape: Shape, config: RunConfig, lengths: Lengths, stage: str, needs_reference: bool,
         stage_params: Any = None, device: str = "cpu") -> list[tuple[str, Estimate]]:
    """Settings that bring the estimate under ``budget`` bytes, cheapest change first (at most three)."""
    levers = [
        ("--dtype bfloat16", {"dtype": "bfloat16"}),
        ("--gradient-checkpointing", {"gradient_checkpointing": True}),
        ("--optim adamw_8bit", {"optim": "adamw_8bit"}),
        ("--precompute-ref", {"precompute_ref": True}),
        ("--lora-r 16", {"lora_r": 16}),
        ("--lora-r 16 --load-in-4bit", {"lora_r": 16, "load_in_4bit": True}),
    ]
    found, changes = [], {}
    for label, change in levers:
        changes.update(change)
        tried = attrs.evolve(config, **changes)
        result = estimate(shape, tried, lengths, stage, needs_reference, stage_params, device)
        labels = " ".join(name for name, _ in levers[: levers.index((label, change)) + 1])
        if result.total <= budget:
            found.append((labels, result))
            break
    if not found:
        batch = max(1, config.batch_size)
        while batch > 1:
            batch //= 2
            tried = attrs.evolve(config, **changes, batch_size=batch,
                                 gradient_accumulation_steps=config.gradient_accumulation_steps * config.batch_size // batch)
            result = estimate(shape, tried, lengths, stage, needs_reference, stage_params, device)
            if result.total <= budget:
                found.append((f"all of the above and --batch-size {batch} --gradient-accumulation-steps "
                              f"{tried.gradient_accumulation_steps}", result))
                break
    return found


def parse_size(text: str) -> int:
    """``24GB``, ``512MB``, ``1.5 GiB`` → bytes."""
    import re

    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text.upper().replace("IB", "IB"))
    if not match:
        raise ValueError(f"expected a size such as 24GB or 512MB, got {text!r}")
    number, unit, binary = match.groups()
    power = " KMGT".index(unit or " ")
    return int(float(number) * (1024 if binary else 1000) ** power)


def gigabytes(value: int) -> str:
    return f"{value / 1e9:.2f} GB" if not math.isnan(value) else "?"


def estimate_run(config: RunConfig, step: Any, host: Any, device: str | None = None) -> Estimate:
    """The estimate of one resolved step of ``molting run``: its model's config, its data's lengths, its settings.

    Reads config.json and the tokenizer, never the weights.
    """
    import torch

    from molting.models import load_tokenizer, resolve_model_path
    from molting.pipeline import load_rows
    from molting.resolve import make_stage_params

    path = resolve_model_path(config.model)
    shape = model_shape(path, config.lora_target_modules, config.trust_remote_code)
    rows, _ = load_rows(host, step, config.data)
    lengths = data_lengths(rows, load_tokenizer(path, config.trust_remote_code), config, step.stage.name)
    needs_reference = step.loss is not None and step.loss.needs_reference
    if step.stage.name == "grpo":
        needs_reference = getattr(make_stage_params(step, config), "beta", 0) > 0
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return estimate(shape, config, lengths, step.stage.name, needs_reference, make_stage_params(step, config), device)
