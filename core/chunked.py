"""Per-token log-probs through the output layer, a chunk of positions at a time.

The stages score completions by running the output layer on every completion
position and log-softmaxing the result. With a real vocabulary that
``(positions x vocabulary)`` float tensor is the largest thing in training (16
sequences x 200 tokens x 151,936 x 4 bytes is ~2 GB per copy, and autograd keeps
copies for backward). :func:`token_logps` fuses the output layer with the
log-softmax and walks the positions ``chunk_size`` rows at a time, so at most a
few ``(chunk_size x vocabulary)`` buffers are alive at once, in forward and in
backward, whatever the batch.

How backward is done, and why (liger-kernel and verl were the models):

* The weight gradient ``sum_i g_i (onehot_i - softmax_i)^T hidden_i`` needs the
  upstream gradient ``g_i`` of every row, which is only known in backward. So
  when the weight (or bias) needs a gradient, forward saves only ``hidden``,
  ``weight``, ``bias``, ``labels`` and each row's logsumexp, and backward
  recomputes each chunk's logits (as verl does). liger can do its backward
  inside forward because its loss is reduced to a scalar: the upstream gradient
  is one number applied at the end; per-token log-probs have no such shortcut.
* When only ``hidden`` needs a gradient (LoRA: the output layer is frozen), the
  gradient of row ``i`` is ``g_i * d_i`` with ``d_i = dlogp_i / dhidden_i``
  independent of ``g``. Forward then computes ``d`` chunk by chunk, while the
  chunk's softmax is at hand (liger's idea), and keeps only that ``(N x H)``
  float32 tensor: backward is a multiplication, with no second pass over the
  vocabulary. On a CPU that removes a third of the output layer's
  matrix-multiply work for the price of one hidden-sized tensor, which is small
  next to a single chunk of logits.

Precision: the logits' matrix multiply runs in the inputs' dtype, or autocast's
when autocast is on (as the model's own ``lm_head`` would), and everything after
it in float32, as the stages do with ``.float()`` on the logits (float64 inputs
stay float64, for gradcheck). A bf16 weight is not cast up to float32: that
copy would be vocabulary x hidden x 4 bytes (544 MB for Qwen2.5-0.5B), more
than a chunk. Mixed dtypes outside autocast promote, as torch does (a bf16
weight with float32 hidden states is then cast up once per pass).
The autocast state is read once, when :func:`token_logps` is called, and
replayed explicitly with autocast off inside, so forward and the backward
recompute use the same dtype and produce the same logits even though
HF/accelerate call ``backward()`` outside the autocast region. That is what
``torch.amp.custom_fwd``/``custom_bwd`` are for, but they need a device type
fixed when the function is defined. The weight gradient is accumulated in
float32, in place, so no extra vocabulary x hidden buffer is allocated per chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

#: float32 bytes one chunk's logits may take when ``chunk_size`` is not given.
#: The loop holds about two buffers of that size at once (the logits and their
#: softmax/gradient; with autocast also a bf16 copy), so 128 MiB means roughly
#: 0.3 GB transient, where the unchunked path needs 7.4 GB at 3,200 positions x
#: 151,936 tokens. Below ~128 rows the float32 matrix multiply
#: on CPUs loses speed (see benchmarks/chunked_logps.py), and 128 MiB still gives
#: 128 rows for the largest vocabularies (Gemma's 262,144).
LOGITS_BUDGET_BYTES = 128 * 2**20


class TokenStats(NamedTuple):
    """What :func:`token_logps` returns, one value per position."""

    logps: torch.Tensor  #: (N,) float32 (float64 for float64 inputs) log-prob of each label; differentiable
    entropy: torch.Tensor | None  #: (N,) entropy of each row's distribution; detached
    top1: torch.Tensor | None  #: (N,) bool: the label has the row's highest logit (ties count); detached


class _Head(NamedTuple):
    """How a chunk of hidden rows becomes final logits (fixed for a call, replayed in backward)."""

    dtype: torch.dtype  # the logits matrix multiply's dtype
    scale: float
    softcap: float | None
    temperature: float

    @property
    def acc(self) -> torch.dtype:
        """The dtype of everything after the matrix multiply: float32, or float64 for float64 inputs."""
        return torch.promote_types(self.dtype, torch.float32)


class _Forward(NamedTuple):
    logps: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None
    top1: torch.Tensor | None
    dhidden: torch.Tensor | None  # d logp_i / d hidden_i, when computed in forward


def default_chunk_size(vocab_size: int, budget_bytes: int = LOGITS_BUDGET_BYTES) -> int:
    """Rows per chunk so that one chunk's float32 logits take about ``budget_bytes`` (at least 1 row)."""
    return max(1, budget_bytes // (4 * vocab_size))


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                bias: torch.Tensor | None = None, temperature: float = 1.0, softcap: float | None = None,
                scale: float = 1.0, chunk_size: int | None = None, with_entropy: bool = False,
                with_top1: bool = False) -> TokenStats:
    """Log-probs of ``labels`` under ``log_softmax(f(hidden @ weight.T + bias))``, without an (N, V) tensor.

    ``hidden`` is (N, H): the final hidden states of the positions that predict a
    scored token, already selected and flattened; ``weight`` the output layer's
    (V, H) weight (tied or not), ``bias`` its (V,) bias; ``labels`` (N,) the token
    ids. The logits are multiplied by ``scale`` (Cohere's ``logit_scale``,
    Granite's ``1 / logits_scaling``), then soft-capped as ``softcap *
    tanh(logits / softcap)`` (Gemma's ``final_logit_softcapping``), then divided
    by ``temperature``. Every label must be a real token id: select the real
    positions first (e.g. ``hidden[mask]``, ``labels[mask]``), or clamp padding
    labels to 0 and zero their log-probs with the mask afterwards, which also
    zeroes their gradient. ``chunk_size`` defaults to
    :func:`default_chunk_size`. Gradients flow to whichever of ``hidden``,
    ``weight`` and ``bias`` require them, in their own dtypes; under
    ``torch.no_grad()`` nothing is saved.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.size(1) != weight.size(1):
        raise ValueError(f"need hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"need labels of shape ({hidden.size(0)},), got {tuple(labels.shape)}")
    if temperature <= 0 or (softcap is not None and softcap <= 0):
        raise ValueError("temperature and softcap must be positive")
    chunk = default_chunk_size(weight.size(0)) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    head = _Head(_matmul_dtype(hidden, weight, bias), float(scale), softcap, float(temperature))
    inputs = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        logps, entropy, top1 = _ChunkedTokenLogps.apply(hidden, weight, bias, labels, head, chunk,
                                                        with_entropy, with_top1)
        return TokenStats(logps, entropy, top1)
    # reference passes: no autograd Function, so nothing is saved for a backward that never comes
    with torch.no_grad():
        out = _forward_chunks(hidden, weight, bias, labels, head, chunk, with_entropy, with_top1, False)
    return TokenStats(out.logps, out.entropy, out.top1)


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype:
    """The dtype the model's own output layer would multiply in: autocast's when it is on, else the inputs'."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if bias is not None:
        dtype = torch.promote_types(dtype, bias.dtype)
    device = hidden.device.type
    if dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return dtype


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            head: _Head) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chunk's final float32 logits, and the tanh of the softcap that backward's chain rule needs.

    ``weight`` and ``bias`` are already in ``head.dtype``. Later steps work in
    place so that at most two (rows x V) float32 buffers exist here.
    """
    rows = hidden.to(head.dtype)
    raw = rows @ weight.T if bias is None else torch.addmm(bias, rows, weight.T)
    logits = raw.to(head.acc)  # a no-op in float32; a new tensor (and raw freed on return) otherwise
    if head.softcap is None:
        if head.scale != head.temperature:
            logits.mul_(head.scale / head.temperature)
        return logits, None
    tanh = torch.tanh(logits.mul_(head.scale / head.softcap))
    return torch.mul(tanh, head.softcap / head.temperature, out=logits), tanh


def _dlogits(probs: torch.Tensor, labels: torch.Tensor, tanh: torch.Tensor | None, head: _Head,
             upstream: torch.Tensor | None = None) -> torch.Tensor:
    """Turn a chunk's softmax, in place, into ``d logp / d raw logits`` (times ``upstream`` when given).

    ``d logp / d final = onehot - softmax``; the final logits are
    ``softcap * tanh(scale * raw / softcap) / temperature``, whose derivative is
    ``scale * (1 - tanh^2) / temperature``. ``tanh`` is overwritten.
    """
    grad = probs.neg_()
    grad.scatter_add_(1, labels[:, None], torch.ones_like(grad[:, :1]))
    if upstream is not None:
        grad.mul_(upstream[:, None])
    if tanh is not None:
        grad.mul_(tanh.square_().neg_().add_(1))
    if head.scale != head.temperature:
        grad.mul_(head.scale / head.temperature)
    return grad


def _normalize_(logits: torch.Tensor, labels: torch.Tensor, full: bool) -> tuple[torch.Tensor, ...]:
    """A chunk's logsumexp, label logit and row maximum; with ``full``, its log-softmax and softmax too.

    Allocates one (rows x V) buffer, the exponentials, where ``torch.logsumexp``
    allocates two; ``logits`` is overwritten (with the log-softmax when ``full``).
    """
    top = logits.amax(dim=-1, keepdim=True)
    picked = logits.gather(1, labels[:, None]).squeeze(1)
    probs = logits.sub_(top).exp()
    total = probs.sum(dim=-1, keepdim=True)
    log_total = total.log()
    if full:
        probs.div_(total)
        logits.sub_(log_total)
    return (top + log_total).squeeze(1), picked, top.squeeze(1), logits, probs


def _forward_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                    head: _Head, chunk: int, with_entropy: bool, with_top1: bool, with_dhidden: bool) -> _Forward:
    """Log-probs and logsumexps of all rows (and entropy, top-1 and ``d logp / d hidden`` when asked)."""
    n, acc = hidden.size(0), head.acc
    out = _Forward(hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc),
                   hidden.new_empty(n, dtype=acc) if with_entropy else None,
                   hidden.new_empty(n, dtype=torch.bool) if with_top1 else None,
                   hidden.new_empty(hidden.shape, dtype=acc) if with_dhidden else None)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(head.dtype)  # once per call, not per chunk
        b = None if bias is None else bias.to(head.dtype)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            values = _forward_chunk(hidden[rows], w, b, labels[rows], head, with_entropy, with_top1, with_dhidden)
            for result, value in zip(out, values):
                if result is not None:
                    result[rows] = value
    return out


def _forward_chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                   head: _Head, with_entropy: bool, with_top1: bool, with_dhidden: bool) -> tuple:
    """One chunk's values, in :class:`_Forward`'s order.

    A function of its own so that the chunk's (rows x V) buffers are freed on
    return: in a loop body they would live on while the next chunk's logits are
    computed, doubling the peak.
    """
    logits, tanh = _logits(hidden, weight, bias, head)
    lse, picked, top, log_probs, probs = _normalize_(logits, labels, with_entropy or with_dhidden)
    # -sum(p log p), not lse - sum(p z), which cancels badly in float32
    entropy = log_probs.mul_(probs).sum(dim=-1).neg_() if with_entropy else None
    top1 = picked >= top if with_top1 else None
    dhidden = _dlogits(probs, labels, tanh, head).to(head.dtype) @ weight if with_dhidden else None
    return picked - lse, lse, entropy, top1, dhidden


def _backward_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                     lse: torch.Tensor, upstream: torch.Tensor, head: _Head, chunk: int,
                     needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """Gradients for hidden, weight and bias, recomputing each chunk's logits from the saved logsumexps."""
    grad_hidden = torch.empty_like(hidden) if needs[0] else None
    # accumulated in float32 and in place: a per-chunk (V, H) product would be a second weight-sized buffer
    grad_weight = torch.zeros(weight.shape, dtype=head.acc, device=weight.device) if needs[1] else None
    grad_bias = torch.zeros(weight.size(0), dtype=head.acc, device=weight.device) if needs[2] else None
    upstream = upstream.to(head.acc)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(head.dtype)
        b = None if bias is None else bias.to(head.dtype)
        for start in range(0, hidden.size(0), chunk):
            rows = slice(start, start + chunk)
            grad_rows = _backward_chunk(hidden[rows], w, b, labels[rows], lse[rows], upstream[rows], head,
                                        grad_weight, grad_bias, needs[0])
            if grad_hidden is not None:
                grad_hidden[rows] = grad_rows
    return (grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))


def _backward_chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                    lse: torch.Tensor, upstream: torch.Tensor, head: _Head, grad_weight: torch.Tensor | None,
                    grad_bias: torch.Tensor | None, with_hidden: bool) -> torch.Tensor | None:
    """One chunk's hidden gradient; adds the chunk's share to ``grad_weight`` and ``grad_bias`` in place."""
    logits, tanh = _logits(hidden, weight, bias, head)
    grad = _dlogits(logits.sub_(lse[:, None]).exp_(), labels, tanh, head, upstream)  # all in one buffer
    if grad_weight is not None:
        grad_weight.addmm_(grad.T, hidden.to(head.acc))
    if grad_bias is not None:
        grad_bias += grad.sum(dim=0)
    # in the logits' dtype, as autograd's matmul backward would be
    return grad.to(head.dtype) @ weight if with_hidden else None


class _ChunkedTokenLogps(torch.autograd.Function):
    """Autograd wrapper: saves inputs and logsumexps (or ``d logp / d hidden``), never a (N, V) tensor."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, head, chunk, with_entropy, with_top1):
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.early = needs[0] and not (needs[1] or needs[2])  # frozen output layer: finish the work now
        out = _forward_chunks(hidden, weight, bias, labels, head, chunk, with_entropy, with_top1, ctx.early)
        if ctx.early:
            ctx.save_for_backward(out.dhidden)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, out.lse)
        ctx.head, ctx.chunk, ctx.needs, ctx.hidden_dtype = head, chunk, needs, hidden.dtype
        ctx.mark_non_differentiable(*(t for t in (out.entropy, out.top1) if t is not None))
        return out.logps, out.entropy, out.top1

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps, *_):
        rest = (None,) * 5  # labels, head, chunk, with_entropy, with_top1
        if ctx.early:
            (dhidden,) = ctx.saved_tensors
            return ((dhidden * grad_logps.to(dhidden.dtype)[:, None]).to(ctx.hidden_dtype), None, None, *rest)
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        grads = _backward_chunks(hidden, weight, bias, labels, lse, grad_logps, ctx.head, ctx.chunk, ctx.needs)
        return (*grads, *rest)
