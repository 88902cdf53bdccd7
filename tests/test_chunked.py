"""molting.chunked: chunked per-token log-probs match the plain computation and never build an (N, V) tensor."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from molting.chunked import LOGITS_BUDGET_BYTES, default_chunk_size, token_logps

N, H, V = 24, 8, 96


def make(n=N, h=H, v=V, *, dtype=torch.float32, bias=True, seed=0):
    """Leaf tensors (hidden, weight, bias, labels); about half the labels are their row's argmax."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / h**0.5 * 3
    b = torch.randn(v, generator=gen) if bias else None
    logits = hidden @ weight.T + (0 if b is None else b)
    labels = torch.where(torch.rand(n, generator=gen) < 0.5, logits.argmax(-1), torch.randint(v, (n,), generator=gen))
    leaves = [t.to(dtype).requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    return (*leaves, labels)


def reference(hidden, weight, labels, bias=None, temperature=1.0, softcap=None, scale=1.0, dtype=torch.float64):
    """The unchunked computation; the logits are cast to ``dtype`` after the matmul, as the stages do."""
    logits = F.linear(hidden, weight, bias).to(dtype) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(1, labels[:, None]).squeeze(1), entropy.detach(), logits.argmax(-1) == labels


def grads(logps, *leaves, seed=1):
    """Gradients of a loss that weights each position differently, so per-row upstream gradients matter."""
    coeff = torch.randn(logps.shape, generator=torch.Generator().manual_seed(seed)).to(logps.dtype)
    present = [t for t in leaves if t is not None and t.requires_grad]
    found = torch.autograd.grad((logps * coeff).sum(), present)
    return iter(found)


def as64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


HEADS = {
    "plain": {},
    "temperature": {"temperature": 0.7},
    "softcap": {"softcap": 2.0, "temperature": 1.3},
    "scale": {"scale": 0.6},
}


@pytest.mark.parametrize("chunk", [1, 6, 7, 100], ids=["one-row", "divisor", "non-divisor", "above-N"])
@pytest.mark.parametrize("head", list(HEADS), ids=list(HEADS))
def test_matches_unchunked_fp32(chunk, head):
    hidden, weight, bias, labels = make()
    out = token_logps(hidden, weight, labels, bias=bias, chunk_size=chunk, with_entropy=True, with_top1=True,
                      **HEADS[head])
    h64, w64, b64 = as64(hidden, weight, bias)
    ref_logps, ref_entropy, ref_top1 = reference(h64, w64, labels, b64, **HEADS[head])
    assert out.logps.dtype == torch.float32 and out.top1.dtype == torch.bool
    torch.testing.assert_close(out.logps.double(), ref_logps.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref_entropy, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.top1, ref_top1) and out.top1.any()
    for got, want in zip(grads(out.logps, hidden, weight, bias), grads(ref_logps, h64, w64, b64)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", ["plain", "softcap"])
@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_side_gets_no_gradient(head, frozen):
    """LoRA freezes the output layer (gradient of hidden only, computed in forward); the reverse also works."""
    hidden, weight, bias, labels = make()
    (hidden if frozen == "hidden" else weight).requires_grad_(False)
    bias.requires_grad_(False)
    out = token_logps(hidden, weight, labels, bias=bias, chunk_size=5, **HEADS[head])
    h64, w64, b64 = as64(hidden, weight, bias)
    ref_logps, _, _ = reference(h64, w64, labels, b64, **HEADS[head])
    torch.testing.assert_close(out.logps.double(), ref_logps.detach(), atol=1e-5, rtol=1e-5)
    (got,), (want,) = grads(out.logps, hidden, weight, bias), grads(ref_logps, h64, w64, b64)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert got.shape == (hidden if frozen == "weight" else weight).shape


def tied_model_loss(embedding, mix, ids, labels, chunked: bool):
    """A toy LM whose output layer is its input embedding, scored on chosen and rejected halves."""
    hidden = torch.tanh(embedding[ids] @ mix)
    if chunked:
        side = [token_logps(part, embedding, lab, chunk_size=3).logps for part, lab in
                zip(hidden.chunk(2), labels.chunk(2))]
    else:
        side = [torch.log_softmax(part @ embedding.T, -1).gather(1, lab[:, None]).squeeze(1) for part, lab in
                zip(hidden.chunk(2), labels.chunk(2))]
    return -F.logsigmoid(side[0].sum() - side[1].sum())


def test_tied_embedding_and_two_calls_in_one_graph():
    """The weight's gradient from the output layer adds to its gradient as input embedding."""
    gen = torch.Generator().manual_seed(3)
    embedding = (torch.randn(V, H, generator=gen)).double().requires_grad_()
    mix = (torch.randn(H, H, generator=gen) / H**0.5).double().requires_grad_()
    ids, labels = torch.randint(V, (N,), generator=gen), torch.randint(V, (N,), generator=gen)
    got = torch.autograd.grad(tied_model_loss(embedding, mix, ids, labels, chunked=True), (embedding, mix))
    want = torch.autograd.grad(tied_model_loss(embedding, mix, ids, labels, chunked=False), (embedding, mix))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def test_bf16_inputs():
    """A bf16 model: matmul in bf16 as its lm_head would, softmax in float32, bf16 gradients."""
    hidden, weight, bias, labels = make(dtype=torch.bfloat16)
    out = token_logps(hidden, weight, labels, bias=bias, chunk_size=5, with_entropy=True)
    ref_logps, ref_entropy, _ = reference(hidden, weight, labels, bias, dtype=torch.float32)
    assert out.logps.dtype == torch.float32
    torch.testing.assert_close(out.logps, ref_logps.detach(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out.entropy, ref_entropy, atol=2e-2, rtol=1e-2)
    for got, want in zip(grads(out.logps, hidden, weight, bias), grads(ref_logps, hidden, weight, bias)):
        assert got.dtype == torch.bfloat16
        assert relative_error(got, want) < 2e-2


class Recorder(TorchDispatchMode):
    """Every aten op run inside, with its inputs' dtypes and the largest tensor it returns."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        dtypes = [t.dtype for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
        self.ops.append((func, dtypes, max((t.numel() for t in results), default=0)))
        return out

    @property
    def largest(self):
        return max(numel for _, _, numel in self.ops)


@pytest.mark.parametrize("backward_in_autocast", [False, True], ids=["backward-outside", "backward-inside"])
def test_autocast_bf16_matches_unchunked_autocast(backward_in_autocast):
    """molting trains under CPU bf16 autocast; the chunks must multiply in bf16 as the model's lm_head does."""
    hidden, weight, bias, labels = make(n=40, v=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with Recorder() as rec:
            out = token_logps(hidden, weight, labels, bias=bias, chunk_size=8, softcap=3.0, with_entropy=True)
        ref_logps, ref_entropy, _ = reference(hidden, weight, labels, bias, softcap=3.0, dtype=torch.float32)
        if backward_in_autocast:
            got, want = list(grads(out.logps, hidden, weight, bias)), list(grads(ref_logps, hidden, weight, bias))
    if not backward_in_autocast:  # as HF / accelerate do
        got, want = list(grads(out.logps, hidden, weight, bias)), list(grads(ref_logps, hidden, weight, bias))
    assert any(func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and torch.bfloat16 in dtypes
               for func, dtypes, _ in rec.ops)
    assert out.logps.dtype == torch.float32
    torch.testing.assert_close(out.logps, ref_logps.detach(), atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(out.entropy, ref_entropy, atol=3e-2, rtol=1e-2)
    for g, w, leaf in zip(got, want, (hidden, weight, bias)):
        assert g.dtype == leaf.dtype == torch.float32
        assert relative_error(g, w) < 3e-2


def test_no_grad_saves_nothing():
    hidden, weight, bias, labels = make()
    saved = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = token_logps(hidden, weight, labels, bias=bias, chunk_size=5, with_top1=True)
    assert out.logps.grad_fn is None and not out.logps.requires_grad and out.entropy is None and not saved
    ref_logps, _, ref_top1 = reference(*as64(hidden, weight), labels, bias.double())
    torch.testing.assert_close(out.logps.double(), ref_logps.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.top1, ref_top1)


@pytest.mark.parametrize("frozen_weight", [False, True], ids=["recompute", "frozen-weight"])
def test_saves_only_small_tensors(frozen_weight):
    """What autograd keeps: the inputs and per-row values (or the hidden-sized d logp / d hidden)."""
    hidden, weight, bias, labels = make()
    weight.requires_grad_(not frozen_weight)
    bias.requires_grad_(not frozen_weight)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = token_logps(hidden, weight, labels, bias=bias, chunk_size=5, with_entropy=True, with_top1=True)
    assert not out.entropy.requires_grad and not out.top1.requires_grad
    assert saved and sum(t.numel() for t in saved) <= N * H + (0 if frozen_weight else V * H + V + 2 * N)


@pytest.mark.parametrize("frozen_weight", [False, True], ids=["recompute", "frozen-weight"])
def test_gradcheck_float64(frozen_weight):
    hidden, weight, bias, labels = make(n=5, h=3, v=7, dtype=torch.float64)
    if frozen_weight:
        weight.requires_grad_(False)
        bias.requires_grad_(False)

    def f(hidden, weight, bias):
        return token_logps(hidden, weight, labels, bias=bias, chunk_size=2, softcap=2.5, temperature=0.8,
                           scale=1.5).logps

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def run_forward_backward(chunked: bool, hidden, weight, bias, labels, chunk: int):
    with Recorder() as rec:
        if chunked:
            logps = token_logps(hidden, weight, labels, bias=bias, chunk_size=chunk, with_entropy=True,
                                with_top1=True).logps
        else:
            logps = reference(hidden, weight, labels, bias, dtype=torch.float32)[0]
        logps.sum().backward()
    return rec


@pytest.mark.parametrize("frozen_weight", [False, True], ids=["recompute", "frozen-weight"])
def test_never_creates_a_positions_by_vocabulary_tensor(frozen_weight):
    """The key property: in forward and backward no op returns more than chunk x V elements."""
    n, h, v, chunk = 256, 4, 512, 16  # N x V = 131072; chunk x V = 8192; V x H = 2048
    hidden, weight, bias, labels = make(n=n, h=h, v=v)
    weight.requires_grad_(not frozen_weight)
    rec = run_forward_backward(True, hidden, weight, bias, labels, chunk)
    assert rec.largest <= chunk * v, f"chunked path created a tensor of {rec.largest} elements"
    assert hidden.grad is not None and (weight.grad is not None) != frozen_weight
    assert run_forward_backward(False, hidden, weight, bias, labels, chunk).largest >= n * v  # the test can see it


class LiveBytes(TorchDispatchMode):
    """Peak bytes alive at once among the storages that ops inside create (one dies with its last tensor).

    Tensors kept only by C++ (autograd's saved tensors) keep their Python object
    alive too, so the count includes them.
    """

    def __init__(self):
        super().__init__()
        self.tensors, self.size, self.live, self.peak = {}, {}, 0, 0

    def _release(self, ptr):
        self.tensors[ptr] -= 1
        if not self.tensors[ptr]:
            del self.tensors[ptr]
            self.live -= self.size.pop(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.tensors:
                    self.tensors[ptr], self.size[ptr] = 0, t.untyped_storage().nbytes()
                    self.live += self.size[ptr]
                    self.peak = max(self.peak, self.live)
                self.tensors[ptr] += 1
                weakref.finalize(t, self._release, ptr)
        return out


@pytest.mark.parametrize("frozen_weight", [False, True], ids=["recompute", "frozen-weight"])
def test_peak_memory_is_a_few_chunks(frozen_weight):
    """At most ~2 chunks of float32 logits alive at once (not one per chunk, nor the last chunk's kept around)."""
    n, h, v, chunk = 256, 2, 2048, 16  # chunk x V x 4 = 128 KiB dominates V x H and N x H
    hidden, weight, _, labels = make(n=n, h=h, v=v, bias=False)
    weight.requires_grad_(not frozen_weight)
    with LiveBytes() as mem:
        token_logps(hidden, weight, labels, chunk_size=chunk, with_entropy=True, with_top1=True).logps.sum().backward()
    assert mem.peak <= 3 * chunk * v * 4, f"peak {mem.peak / (chunk * v * 4):.2f} chunks of logits"
    with LiveBytes() as mem:
        reference(hidden, weight, labels, dtype=torch.float32)[0].sum().backward()
    assert mem.peak >= n * v * 4


def test_default_chunk_size():
    assert default_chunk_size(151_936) == LOGITS_BUDGET_BYTES // (4 * 151_936)
    assert 4 * 151_936 * default_chunk_size(151_936) <= LOGITS_BUDGET_BYTES
    assert default_chunk_size(262_144) >= 64 and default_chunk_size(32_000) > default_chunk_size(151_936)
    assert default_chunk_size(10**12) == 1
    assert default_chunk_size(1000, budget_bytes=40_000) == 10


def test_default_chunk_matches_explicit():
    hidden, weight, bias, labels = make()
    a = token_logps(hidden, weight, labels, bias=bias).logps
    b = token_logps(hidden, weight, labels, bias=bias, chunk_size=default_chunk_size(V)).logps
    assert torch.equal(a, b)


def test_empty_input():
    hidden, weight, bias, labels = make(n=0)
    out = token_logps(hidden, weight, labels, bias=bias, with_entropy=True, with_top1=True)
    assert out.logps.shape == out.entropy.shape == out.top1.shape == (0,)
    out.logps.sum().backward()
    assert hidden.grad.shape == (0, H) and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("bad", ["hidden-3d", "labels-shape", "chunk-0", "temperature-0", "width"])
def test_rejects_bad_arguments(bad):
    hidden, weight, _, labels = make()
    kwargs = {"chunk_size": 0} if bad == "chunk-0" else {"temperature": 0.0} if bad == "temperature-0" else {}
    if bad == "hidden-3d":
        hidden = hidden[None]
    elif bad == "labels-shape":
        labels = labels[:-1]
    elif bad == "width":
        weight = weight[:, :-1]
    with pytest.raises(ValueError):
        token_logps(hidden, weight, labels, **kwargs)
