"""Token log-probabilities of completions: every place a stage turns a model's output into log-probs.

The output layer runs only on the positions that can predict a completion
token (``logits_to_keep``), never on the whole sequence. Four shapes of
batch, one function each:

- :func:`completion_logps`: right-padded prompt+completion rows with a
  ``completion_mask`` (the preference, unpaired stages; reference passes);
- :func:`completion_token_logps`: left-padded prompts followed by
  right-padded sampled completions, at a sampling temperature (the online
  stages: GRPO, PPO), with entropies;
- :func:`completion_token_stats`: rows with ``labels`` (-100 outside the
  completion), with entropy and top-1 accuracy (the SFT stage);
- :func:`packed_completion_logps`: one padding-free packed row
  (:mod:`molting.packing`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from molting.sampling import sequence_inputs


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
    the last ``k`` positions, the ones that can predict a completion token,
    instead of on the whole sequence.
    """
    length = input_ids.size(1)
    first_completion = completion_mask.float().argmax(dim=1).min().item()
    keep = length - max(int(first_completion), 1) + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep).logits
    logits = logits[:, :-1].float()
    labels = input_ids[:, length - keep + 1 :]
    mask = completion_mask[:, length - keep + 1 :].to(logits.dtype)
    token_logps = torch.gather(logits, 2, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    token_logps = token_logps * mask
    return token_logps.sum(dim=1), token_logps, mask


def completion_token_logps(model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           completion_ids: torch.Tensor, completion_mask: torch.Tensor, temperature: float = 1.0,
                           with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs ``(N, C)`` of the completions (and their entropies), as trl computes them.

    The logits are divided by the sampling temperature, so the log-probs are
    those of the distribution the tokens were sampled from. Position ids
    follow the attention mask, as in generation with left padding. The output
    layer runs only on the positions that predict completion tokens, and the
    log-softmax goes row by row, as trl's ``selective_log_softmax`` does, so
    a large vocabulary needs one row's float copy at a time.
    """
    input_ids, attention_mask, position_ids = sequence_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    keep = completion_ids.size(1) + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                   logits_to_keep=keep).logits
    rows_logps, rows_entropy = [], []
    for row_logits, row_ids in zip(logits[:, :-1], completion_ids):  # one row at a time: (C, V) float copies, not (B, C, V)
        row = row_logits.float() / temperature
        logsumexp = torch.logsumexp(row, dim=-1)
        rows_logps.append(torch.gather(row, 1, row_ids.unsqueeze(-1)).squeeze(-1) - logsumexp)
        if with_entropy:
            with torch.no_grad():
                rows_entropy.append(logsumexp - (torch.softmax(row, dim=-1) * row).sum(dim=-1))
    entropy = torch.stack(rows_entropy) if with_entropy else None
    return torch.stack(rows_logps), entropy


def completion_token_stats(model: Any, input_ids: Any, attention_mask: Any, labels: Any) -> tuple[Any, Any, Any, Any]:
    """Per-token log-probs of the labelled tokens, their mask, and (without gradients) entropy and top-1 hits.

    Shapes ``(batch, k)``: the output layer runs only on the last ``k``
    positions, the ones that can predict a labelled token (as
    :func:`completion_logps` does), and everything is zero
    outside the mask.
    """
    import torch

    length = input_ids.size(1)
    first_label = int((labels != -100).float().argmax(dim=1).min())
    keep = length - max(first_label, 1) + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep).logits
    logits = logits[:, :-1].float()
    targets = labels[:, length - keep + 1 :]
    mask = targets != -100
    normaliser = torch.logsumexp(logits, dim=-1)
    picked = torch.gather(logits, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = (picked - normaliser) * mask
    with torch.no_grad():
        logps = logits - normaliser.unsqueeze(-1)
        entropy = -(logps.exp() * logps).sum(dim=-1) * mask
        top1 = (logits.argmax(dim=-1) == targets) & mask
    return token_logps, mask, entropy, top1


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
    logits = model(input_ids=ids, position_ids=batch["position_ids"], use_cache=False, logits_to_keep=keep,
                   cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest).logits[0].float()
    labels = ids[0, keep + 1]
    token_logps = torch.gather(logits, 1, labels[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    count = cu.numel() - 1
    owner = segments[keep]
    sums = token_logps.new_zeros(count).index_add(0, owner, token_logps)
    per_sequence = torch.bincount(owner, minlength=count)
    column = torch.arange(keep.numel(), device=keep.device) - (per_sequence.cumsum(0) - per_sequence)[owner]
    width = max(int(per_sequence.max()), 1)
    per_token = token_logps.new_zeros(count, width).index_put((owner, column), token_logps)
    mask = token_logps.new_zeros(count, width).index_put((owner, column), torch.ones_like(token_logps))
    return sums, per_token, mask
