"""Padding-free batches: several sequences packed into one row, no pad token.

A packed row carries ``position_ids`` that restart at each sequence and
``cu_seq_lens`` (cumulative sequence lengths, flash-attention's varlen
format), so attention never crosses from one sequence into the next:

- with a flash-attention model, transformers' own varlen kernel reads
  ``cu_seq_lens_q``/``cu_seq_lens_k``;
- otherwise :func:`use_varlen_attention` switches the model to
  ``molting_varlen_sdpa``, an attention function registered through
  transformers' ``AttentionInterface`` that runs PyTorch's SDPA once per
  sequence with a causal mask. It is the CPU (and no-flash-attn GPU)
  counterpart of the varlen kernel: the linear layers see no padding and
  attention costs the sum of squared lengths, where a block-diagonal mask over
  the packed row would cost its length squared. Without a ``cu_seq_lens_q``
  argument it is plain SDPA, so padded batches, evaluation and generation
  run as before.

Hand-written because neither transformers nor PyTorch ships a varlen SDPA for
CPU; it is one loop around ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "molting_varlen_sdpa"


def _varlen_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 cu_seq_lens_q: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.size(0) != 1:
        raise ValueError(f"{VARLEN_ATTENTION} takes one packed row, got a batch of {query.size(0)}")
    groups = query.size(1) // key.size(1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    lengths = cu_seq_lens_q.diff().tolist()
    dropout = dropout if module.training else 0.0
    # split (not slicing one by one): its backward is one concatenation instead of a full-size zero tensor per slice
    outputs = [
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=dropout)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _varlen_mask(batch_size: int, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor | None:
    """No mask for one unpadded row without a cache (the attention function keeps sequences apart); SDPA's otherwise."""
    from transformers.masking_utils import sdpa_mask

    if batch_size == 1 and attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask,
                     **kwargs)


def use_varlen_attention(model: Any) -> str:
    """Give ``model`` an attention that respects ``cu_seq_lens``; returns the implementation it then uses.

    Flash-attention models keep theirs (it reads ``cu_seq_lens`` natively);
    SDPA and eager models switch to ``molting_varlen_sdpa``. Either way a
    probe proves that a packed row gives each sequence the logits the model
    gave it alone, with its own attention: a model whose layers do not pass
    the boundaries on (GPT-2's did not, once) or whose attention SDPA cannot
    compute (Gemma 2's soft-capped scores) is refused rather than trained on
    something else.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from molting.errors import ConfigError

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = str(getattr(base.config, "_attn_implementation", ""))
    if getattr(base.config.get_text_config(), "attn_logit_softcapping", None):
        raise ConfigError(f"--padding-free: the {base.config.model_type} model soft-caps its attention scores, which "
                          "the packed (varlen) attention does not; drop --padding-free")
    alone = _probe(model, packed=False)
    if "flash" not in current and current != VARLEN_ATTENTION:
        AttentionInterface.register(VARLEN_ATTENTION, _varlen_sdpa)
        AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
        base.set_attn_implementation(VARLEN_ATTENTION)
        current = VARLEN_ATTENTION
    if not torch.allclose(_probe(model, packed=True), alone, atol=1e-3, rtol=1e-3):
        raise ConfigError(
            f"--padding-free: the {base.config.model_type} model gives a packed row other logits than its "
            "sequences alone (its layers do not pass cu_seq_lens on to attention); drop --padding-free"
        )
    return current


def _probe(model: Any, packed: bool) -> torch.Tensor:
    """Logits of the sequence [6, 7, 8], alone or packed after [3, 4, 5] (its part of the row)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if not packed:
                return model(input_ids=torch.tensor([[6, 7, 8]], device=device)).logits[0].float()
            row = pack([[3, 4, 5], [6, 7, 8]], [0, 0])
            cu = row["cu_seq_lens"].to(device)
            return model(input_ids=row["input_ids"].to(device), position_ids=row["position_ids"].to(device),
                         cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=3, max_length_k=3).logits[0, 3:].float()
    finally:
        model.train(was_training)


def pack(sequences: list[list[int]], prompt_lengths: list[int]) -> dict[str, torch.Tensor]:
    """One packed row of ``sequences``: ids, restarting positions, segment numbers, completion mask, ``cu_seq_lens``."""
    ids, positions, segments, completion = [], [], [], []
    for number, (sequence, prompt) in enumerate(zip(sequences, prompt_lengths)):
        ids += sequence
        positions += range(len(sequence))
        segments += [number] * len(sequence)
        completion += [0] * prompt + [1] * (len(sequence) - prompt)
    lengths = torch.tensor([0] + [len(s) for s in sequences])
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([positions]),
        "segment_ids": torch.tensor([segments]),
        "completion_mask": torch.tensor([completion]),
        "cu_seq_lens": lengths.cumsum(0).to(torch.int32),
    }
