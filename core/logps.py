"""Token log-probabilities of completions: every place a stage turns a model's output into log-probs.

The output layer runs only on the positions that predict a scored token
(``logits_to_keep``), and there a chunk of positions at a time
(:mod:`molting.chunked`): the model's forward runs with its own output layer
on no position, a pre-hook takes the hidden states it was about to project,
and :func:`molting.chunked.token_logps` turns them into log-probs (and
entropies, top-1 hits) without ever holding a (tokens × vocabulary) tensor,
in forward or backward. ``logits_chunk_size(0)`` (``--logits-chunk-size 0``)
computes full logits instead, as does any model whose output layer is not a
plain linear layer (LoRA on it, a quantized head, custom code) or does not
match the chunked formula on a first check: then a warning says so once.

Four shapes of batch, one function each:

- :func:`completion_logps`: right-padded prompt+completion rows with a
  ``completion_mask`` (the preference, unpaired stages; reference passes);
- :func:`completion_token_logps`: left-padded prompts followed by
  right-padded sampled completions, at a sampling temperature (the online
  stages: GRPO, PPO), with entropies;
- :func:`completion_token_stats`: rows with ``labels`` (-100 outside the
  completion), with entropy and top-1 accuracy (the SFT stage);
- :func:`packed_completion_logps`: one padding-free packed row
  (:mod:`molting.packing`).

Every per-token result is zero outside its mask.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import torch

from molting.sampling import sequence_inputs

LOGITS_CHUNK_SIZE: contextvars.ContextVar[int | None] = contextvars.ContextVar("molting_logits_chunk_size",
                                                                             default=None)
"""Positions of the output layer computed at a time: ``None`` picks by vocabulary
(:func:`molting.chunked.default_chunk_size`), ``0`` computes full logits."""


@contextlib.contextmanager
def logits_chunk_size(size: int | None) -> Iterator[None]:
    """Compute log-probs ``size`` positions at a time inside the block (``None``: by vocabulary; 0: full logits).

    ``molting run`` sets it from ``--logits-chunk-size`` around each stage.
    """
    token = LOGITS_CHUNK_SIZE.set(size)
    try:
        yield
    finally:
        LOGITS_CHUNK_SIZE.reset(token)


class Head(NamedTuple):
    """A model's output layer as :func:`molting.chunked.token_logps` takes it."""

    module: torch.nn.Module  # the module forward calls (a peft wrapper keeps its own)
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    scale: float


def output_layer(model: Any) -> Head | None:
    """The output layer of a causal LM and how its logits are finished, or ``None`` when the chunked formula
    cannot stand in for it (then the full logits are computed).

    Handles DDP and peft wrappers, a tied or untied head with or without
    bias, Gemma's ``final_logit_softcapping``, Cohere's ``logit_scale`` and
    Granite's ``logits_scaling``.
    """
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    head = module
    if hasattr(head, "original_module"):  # peft's modules_to_save: the copy forward uses now
        active = head.active_adapters and not head.disable_adapters
        head = head.modules_to_save[head.active_adapters[0]] if active else head.original_module
    if type(head) is not torch.nn.Linear or type(head.weight) is not torch.nn.Parameter:
        return None  # LoRA on the head, a quantized head, a sharded (FSDP/DTensor) weight, custom code
    if tuple(head.weight.shape) != (head.out_features, head.in_features):
        return None  # a flattened FSDP parameter
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    kind, scale = str(getattr(config, "model_type", "")), 1.0
    if kind.startswith("cohere"):
        scale = float(config.logit_scale)
    elif kind.startswith("granite"):
        scale = 1.0 / float(config.logits_scaling)
    elif getattr(config, "logits_scaling", None) not in (None, 1, 1.0):
        return None  # a scaling of the logits whose direction this does not know
    return Head(module, head.weight, head.bias, getattr(config, "final_logit_softcapping", None), scale)


class TokenStats(NamedTuple):
    """Per-token results of :func:`kept_token_stats`, shape ``(batch, positions)``, zero outside the mask."""

    logps: torch.Tensor
    entropy: torch.Tensor | None
    top1: torch.Tensor | None


def kept_token_stats(model: Any, inputs: Mapping[str, Any], keep: int | torch.Tensor, labels: torch.Tensor,
                     mask: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False,
                     with_top1: bool = False) -> TokenStats:
    """Log-probs of ``labels`` ``(B, K)`` predicted at the positions ``model(**inputs, logits_to_keep=keep)`` keeps.

    With an int ``keep`` the last kept position predicts nothing and is
    dropped (so ``K = keep - 1``); with an index tensor each kept position
    predicts its label. ``mask`` (B, K) says which labels count.
    """
    mask = mask.bool()
    head = output_layer(model)
    size = LOGITS_CHUNK_SIZE.get()
    if head is None or size == 0 or getattr(head.module, "_molting_chunks", True) is False:
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        return _from_logits(logits[:, :-1] if isinstance(keep, int) else logits, labels, mask, temperature,
                            with_entropy, with_top1)
    check = not hasattr(head.module, "_molting_chunks")

    def stats_of(captured: _Captured) -> TokenStats:
        hidden = captured.hidden[:, :-1] if isinstance(keep, int) else captured.hidden
        return _chunked(head, captured, hidden, labels, mask, size, temperature, with_entropy, with_top1)

    with _head_input(head.module, positions=1 if check else 0, compute=stats_of) as captured:
        out = model(**inputs, use_cache=False, logits_to_keep=keep)
    if check and not _matches(head, captured, out.logits, labels):
        head.module._molting_chunks = False
        return kept_token_stats(model, inputs, keep, labels, mask, temperature, with_entropy, with_top1)
    head.module._molting_chunks = True
    return captured.stats


class _Captured:
    hidden: torch.Tensor
    autocast: tuple[str, bool, torch.dtype]
    stats: TokenStats


@contextlib.contextmanager
def _head_input(module: torch.nn.Module, positions: int,
                compute: Callable[[_Captured], TokenStats]) -> Iterator[_Captured]:
    """Inside the model's forward, capture what it feeds its output layer (and the autocast state it runs in) and
    ``compute`` the chunked stats from it; the layer itself then runs on ``positions`` positions (0, or 1 to check
    the chunked formula against it)."""
    captured = _Captured()

    def take_input(layer: Any, args: tuple, kwargs: dict) -> tuple:
        hidden = args[0]
        device = hidden.device.type
        enabled = torch.is_autocast_enabled(device)
        captured.hidden = hidden
        captured.autocast = (device, enabled, torch.get_autocast_dtype(device) if enabled else hidden.dtype)
        return (hidden[..., :positions, :], *args[1:]), kwargs

    def attach(layer: Any, args: tuple, output: Any) -> Any:
        captured.stats = compute(captured)
        if not isinstance(output, torch.Tensor):
            return output
        # The model's output carries the chunked stats' graph, not the layer's own: backward then gives the layer's
        # weight no (vocabulary x hidden) zero gradient, and DDP's search for unused parameters, which walks the
        # graph from the model's output, finds every parameter the loss will reach (adding an empty sum: exactly 0)
        return output.detach() + captured.stats.logps[..., :0].sum().to(output.dtype)

    handles = [module.register_forward_pre_hook(take_input, with_kwargs=True), module.register_forward_hook(attach)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _chunked(head: Head, captured: _Captured, hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
             size: int | None, temperature: float, with_entropy: bool, with_top1: bool) -> TokenStats:
    from molting.chunked import token_logps

    device, enabled, dtype = captured.autocast
    with torch.autocast(device, dtype=dtype, enabled=enabled):  # as the model's own output layer would have run
        stats = token_logps(hidden[mask], head.weight, labels[mask], bias=head.bias, temperature=temperature,
                            softcap=head.softcap, scale=head.scale, chunk_size=size, with_entropy=with_entropy,
                            with_top1=with_top1)

    def scattered(values: torch.Tensor | None) -> torch.Tensor | None:
        return None if values is None else values.new_zeros(mask.shape).masked_scatter(mask, values)

    return TokenStats(scattered(stats.logps), scattered(stats.entropy), scattered(stats.top1))


def _matches(head: Head, captured: _Captured, logits: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether the chunked formula gives the model's own log-probs at the first kept position (once per model)."""
    from molting.chunked import token_logps

    with torch.no_grad():
        own = torch.log_softmax(logits[:, 0].float(), dim=-1)
        device, enabled, dtype = captured.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            ours = token_logps(captured.hidden[:, 0], head.weight, labels[:, 0], bias=head.bias,
                               softcap=head.softcap, scale=head.scale, with_entropy=True)
        picked = own.gather(1, labels[:, :1]).squeeze(1)
        entropy = -(own.exp() * own).sum(dim=-1)
        tolerance = 1e-3 if dtype == torch.float32 else 5e-2
        same = torch.allclose(ours.logps, picked, atol=tolerance, rtol=tolerance) and torch.allclose(
            ours.entropy, entropy, atol=tolerance, rtol=tolerance)
    if not same:
        print(f"molting: warning: the output layer of {type(head.module).__name__} does not match the chunked "
              "log-prob formula; computing full logits (more memory)", file=sys.stderr)
    return same


def _from_logits(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, temperature: float,
                 with_entropy: bool, with_top1: bool) -> TokenStats:
    """The full-logits path, a row at a time: (K, V) float copies, not (B, K, V) (trl's selective_log_softmax)."""
    rows_logps, rows_entropy, rows_top1 = [], [], []
    for row_logits, row_labels in zip(logits, labels.clamp(min=0)):
        row = row_logits.float() / temperature
        logsumexp = torch.logsumexp(row, dim=-1)
        rows_logps.append(torch.gather(row, 1, row_labels.unsqueeze(-1)).squeeze(-1) - logsumexp)
        with torch.no_grad():
            if with_entropy:
                logp = row - logsumexp.unsqueeze(-1)
                rows_entropy.append(-(logp.exp() * logp).sum(dim=-1))
            if with_top1:
                rows_top1.append(row.gather(1, row_labels.unsqueeze(-1)).squeeze(-1) >= row.max(dim=-1).values)
    logps = torch.stack(rows_logps) * mask
    entropy = torch.stack(rows_entropy) * mask if with_entropy else None
    top1 = torch.stack(rows_top1) & mask if with_top1 else None
    return TokenStats(logps, entropy, top1)


# --------------------------------------------------------------------------- the four batch shapes


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the completion tokens of right-padded sequences.

    Returns ``(sum_logps, token_logps, token_mask)``: the per-sequence sum
    (shape ``(batch,)``), and per-token log-probs with their mask (shape
    ``(batch, k)``, zero outside the completion). The output layer runs only on
    the last ``k`` positions, the ones that can predict a completion token.
    """
    length = input_ids.size(1)
    first_completion = completion_mask.float().argmax(dim=1).min().item()
    keep = length - max(int(first_completion), 1) + 1
    labels = input_ids[:, length - keep + 1 :]
    mask = completion_mask[:, length - keep + 1 :]
    stats = kept_token_stats(model, {"input_ids": input_ids, "attention_mask": attention_mask}, keep, labels, mask)
    return stats.logps.sum(dim=1), stats.logps, mask.to(stats.logps.dtype)


def completion_token_logps(model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           completion_ids: torch.Tensor, completion_mask: torch.Tensor, temperature: float = 1.0,
                           with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs ``(N, C)`` of the completions (and their entropies), as trl computes them.

    The logits are divided by the sampling temperature, so the log-probs are
    those of the distribution the tokens were sampled from. Position ids
    follow the attention mask, as in generation with left padding. Zero
    outside ``completion_mask``.
    """
    input_ids, attention_mask, position_ids = sequence_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    stats = kept_token_stats(model, inputs, completion_ids.size(1) + 1, completion_ids, completion_mask,
                             temperature=temperature, with_entropy=with_entropy)
    return stats.logps, stats.entropy


def completion_token_stats(model: Any, input_ids: Any, attention_mask: Any, labels: Any) -> tuple[Any, Any, Any, Any]:
    """Per-token log-probs of the labelled tokens, their mask, and (without gradients) entropy and top-1 hits.

    Shapes ``(batch, k)``: the output layer runs only on the last ``k``
    positions, the ones that can predict a labelled token (as
    :func:`completion_logps` does), and everything is zero outside the mask.
    """
    length = input_ids.size(1)
    first_label = int((labels != -100).float().argmax(dim=1).min())
    keep = length - max(first_label, 1) + 1
    targets = labels[:, length - keep + 1 :]
    mask = targets != -100
    stats = kept_token_stats(model, {"input_ids": input_ids, "attention_mask": attention_mask}, keep,
                             targets.clamp(min=0), mask, with_entropy=True, with_top1=True)
    return stats.logps, mask, stats.entropy, stats.top1


def packed_completion_logps(model: torch.nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Completion log-probs of a packed row (see :func:`pack`), one result row per sequence.

    Returns per-sequence sums (shape ``(sequences,)``) and per-token log-probs
    with their mask (shape ``(sequences, longest completion)``, left-aligned).
    The model runs with ``cu_seq_lens`` (use :func:`use_varlen_attention`
    first), and its output layer only on the positions that predict a
    completion token.
    """
    ids, segments, cu = batch["input_ids"], batch["segment_ids"][0], batch["cu_seq_lens"]
    longest = int((cu[1:] - cu[:-1]).max())
    # position t predicts token t+1: keep it when t+1 is a completion token of the same sequence
    predicts = (batch["completion_mask"][0, 1:] > 0) & (segments[1:] == segments[:-1])
    keep = predicts.nonzero().squeeze(1)
    inputs = {"input_ids": ids, "position_ids": batch["position_ids"], "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
              "max_length_q": longest, "max_length_k": longest}
    labels = ids[:, keep + 1]
    token_logps = kept_token_stats(model, inputs, keep, labels, torch.ones_like(labels, dtype=torch.bool)).logps[0]
    count = cu.numel() - 1
    owner = segments[keep]
    sums = token_logps.new_zeros(count).index_add(0, owner, token_logps)
    per_sequence = torch.bincount(owner, minlength=count)
    column = torch.arange(keep.numel(), device=keep.device) - (per_sequence.cumsum(0) - per_sequence)[owner]
    width = max(int(per_sequence.max()), 1)
    per_token = token_logps.new_zeros(count, width).index_put((owner, column), token_logps)
    mask = token_logps.new_zeros(count, width).index_put((owner, column), torch.ones_like(token_logps))
    return sums, per_token, mask
