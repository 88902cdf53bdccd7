"""Memory at real shapes: the chunked output layer in every stage, and the memory levers.

Each stage trains the same steps with full logits (``--logits-chunk-size 0``)
and five positions at a time: the logged losses, gradient norms and every
other metric agree, so chunking changes memory, not results. Over three
optimizer steps in fp32 they agree within 1e-4 (relative): each path rounds
differently, and a DPO gradient is a difference of two sequences' gradients,
which magnifies fp32 rounding; the log-prob functions themselves agree
within 1e-5 (``test_each_batch_shape_matches_full_logits``).
"""

from __future__ import annotations

import json
import math

import pytest

import molting
from molting.discovery import load_plugins
from molting.pipeline import run
from molting.resolve import resolve_config

# plugin, flags: two or three logged steps of each stage that turns hidden states into log-probs
STAGES = {
    "dpo": ("dpo", {"batch_size": 4}),
    "dpo-precomputed-reference": ("dpo", {"batch_size": 4, "precompute_ref": True}),
    "dpo-padding-free": ("dpo", {"batch_size": 4, "padding_free": True}),
    "dpo-lora": ("dpo", {"batch_size": 4, "lora_r": 4}),
    "dpo-length-normalised": ("sigmoid_norm", {"batch_size": 4}),
    "reference-free-nll": ("preference", {"batch_size": 4, "losses": {"sft": 1.0}}),
    "kto": ("kto", {"batch_size": 4}),
    "sft": ("sft", {"batch_size": 4}),
    "grpo": ("grpo", {"batch_size": 8, "judges": {"demo-rule": 1.0}, "num_generations": 4, "max_new_tokens": 8,
                      "beta": 0.04}),
    "ppo": ("ppo", {"batch_size": 4, "judges": {"demo-rule": 1.0}, "max_new_tokens": 8}),
}


def train(tmp_path, name, chunk):
    plugin, flags = STAGES[name]
    host = load_plugins(disabled=[])
    stage = plugin if plugin in host.components["stage"] else host.get("loss", plugin).stage
    rows = host.get("dataset", host.get("stage", stage).default_data).load("train")[:8]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / f"out-{chunk}"
    settings = {"max_steps": 3, "logging_steps": 1, "eval": "off", "output_dir": str(out), "data": str(data),
                "precision": "fp32", "logits_chunk_size": chunk, "seed": 3, **flags}
    config, steps = resolve_config(host, [plugin], flags=settings)
    run(config, steps, host)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def close(a, b, tolerance=1e-4):
    return math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_chunked_log_probs_train_as_full_logits_do(tmp_path, name):
    full, chunked = train(tmp_path, name, 0), train(tmp_path, name, 5)  # 5 positions a chunk: many chunks
    assert len(full) == len(chunked) >= 3
    if name in ("grpo", "ppo"):  # later steps sample from weights that differ by rounding: other completions
        full, chunked = full[:1], chunked[:1]
    compared = 0
    for step, (a, b) in enumerate(zip(full, chunked)):
        for key in sorted(set(a) & set(b)):
            noise = key == "rewards/accuracies" and abs(a.get("rewards/margins", 1.0)) < 1e-4  # margins of rounding
            if isinstance(a[key], float) and not key.endswith(("runtime", "_per_second", "per_step")) and not noise:
                assert close(a[key], b[key]), f"step {step}, {key}: full logits {a[key]!r}, chunked {b[key]!r}"
                compared += 1
    assert compared >= 4


# --------------------------------------------------------------------------- the log-prob functions, real vocabularies


def tiny_model(family):
    """A random-weight model of a real family's shape, with its real vocabulary size (tiny otherwise)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shapes = {
        "qwen2": dict(vocab_size=151936, tie_word_embeddings=True),
        "gemma2": dict(vocab_size=256000, final_logit_softcapping=30.0, head_dim=16, query_pre_attn_scalar=16),
        "phi": dict(vocab_size=51200),  # an output layer with a bias
    }
    config = AutoConfig.for_model(family, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  **shapes[family])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def batch(vocab, rows=3, width=24, prompt=9, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, width), generator=g)
    attention = torch.ones(rows, width, dtype=torch.long)
    attention[0, -4:] = 0  # a shorter row, right-padded
    completion = torch.zeros(rows, width, dtype=torch.long)
    completion[:, prompt:] = 1
    completion[0, -4:] = 0
    return ids, attention, completion


def shapes(model, ids, attention, completion):
    """Each batch shape's function, reduced to one number to differentiate, and its per-token results."""
    from molting import logps
    from molting.packing import pack, use_varlen_attention

    labels = ids.masked_fill(completion == 0, -100)
    lengths = attention.sum(dim=1).tolist()
    yield "completion_logps", logps.completion_logps(model, ids, attention, completion)[:2]
    yield "completion_token_logps", logps.completion_token_logps(
        model, ids[:, :9], attention[:, :9], ids[:, 9:], completion[:, 9:], temperature=0.7, with_entropy=True)
    yield "completion_token_stats", logps.completion_token_stats(model, ids, attention, labels)
    from molting.errors import ConfigError

    try:
        use_varlen_attention(model)
    except ConfigError:  # Gemma 2 soft-caps its attention scores, which varlen SDPA cannot: packing is refused
        return
    packed = pack([ids[i, : lengths[i]].tolist() for i in range(len(lengths))], [9] * len(lengths))
    yield "packed_completion_logps", logps.packed_completion_logps(model, packed)[:2]


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "phi"])
def test_each_batch_shape_matches_full_logits(family):
    import torch

    from molting.logps import logits_chunk_size, output_layer

    model = tiny_model(family)
    assert output_layer(model) is not None  # the chunked path applies: tied, soft-capped, biased heads
    ids, attention, completion = batch(model.config.vocab_size)
    results = {}
    for size in (0, 7):
        with logits_chunk_size(size):
            for name, outputs in shapes(model, ids, attention, completion):
                model.zero_grad()
                outputs[0].float().sum().backward()
                grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
                results.setdefault(name, []).append(([o.detach().float() for o in outputs if o is not None], grads))
    for name, ((full, full_grad), (chunked, chunked_grad)) in results.items():
        for a, b in zip(full, chunked):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), f"{name}: values differ by {(a - b).abs().max():.3g}"
        relative = ((full_grad - chunked_grad).norm() / full_grad.norm()).item()
        assert relative < 1e-5, f"{name}: gradients differ by {relative:.3g} (relative)"


def parameters_reached(output):
    """The parameters autograd reaches from ``output``: what DDP's search for unused parameters finds."""
    seen, stack, found = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            found.add(id(node.variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


@pytest.mark.parametrize("family", ["qwen2", "phi"], ids=["tied-head", "untied-head"])
def test_the_models_own_output_reaches_every_parameter_the_chunked_loss_does(family):
    """Two-process training (DDP) walks the graph from the model's output to find the parameters a step uses;
    the chunked log-probs are computed inside the forward so that walk finds the output layer and the body."""
    from molting import logps

    model = tiny_model(family).train()
    outputs = []
    handle = model.register_forward_hook(lambda module, args, output: outputs.append(output.logits))
    ids, attention, completion = batch(model.config.vocab_size)
    for step in range(2):  # the first call also checks the formula against the model's own output layer
        outputs.clear()
        total = logps.completion_logps(model, ids, attention, completion)[0].sum()
    handle.remove()
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert parameters_reached(total) == trained
    assert parameters_reached(outputs[0]) == trained
    assert outputs[0].shape[1] == 0  # and the output layer itself ran on no position


def test_a_lora_model_uses_the_frozen_head_path_and_matches(tmp_path):
    import torch

    from molting.logps import completion_logps, logits_chunk_size, output_layer
    from molting.models import apply_lora

    model = apply_lora(tiny_model("qwen2"), 4, 8.0, 0.0, "all-linear")
    assert output_layer(model) is not None and not output_layer(model).weight.requires_grad
    ids, attention, completion = batch(model.config.vocab_size)
    grads = []
    for size in (0, 7):
        with logits_chunk_size(size):
            model.zero_grad()
            total, _, _ = completion_logps(model, ids, attention, completion)
            total.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert ((grads[0] - grads[1]).norm() / grads[0].norm()).item() < 1e-5


def test_a_head_the_formula_does_not_match_falls_back_to_full_logits(capsys):
    """A model that changes its logits after the output layer in a way molting does not know is caught on the
    first call: a warning, and full logits from then on, with the model's own numbers."""
    import torch

    from molting.logps import completion_logps, logits_chunk_size

    model = tiny_model("qwen2")
    original = model.forward

    def doubled(*args, **kwargs):  # custom code: logits scaled after the head
        out = original(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    model.forward = doubled
    ids, attention, completion = batch(model.config.vocab_size)
    with logits_chunk_size(7):
        chunked, _, _ = completion_logps(model, ids, attention, completion)
    with logits_chunk_size(0):
        full, _, _ = completion_logps(model, ids, attention, completion)
    assert "does not match the chunked log-prob formula" in capsys.readouterr().err
    assert torch.allclose(chunked, full)


# --------------------------------------------------------------------------- the other memory levers


def short_run(tmp_path, plugin="dpo", recorder=None, **flags):
    host = load_plugins(disabled=[])
    if recorder is not None:
        host.register(recorder, "recorder")
    settings = {"max_steps": 2, "logging_steps": 1, "eval": "off", "output_dir": str(tmp_path / "out"),
                "batch_size": 4, "precision": "fp32", "seed": 3, **flags}
    config, steps = resolve_config(host, [plugin], flags=settings)
    run(config, steps, host)
    return [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]


def causal_lms():
    import gc

    from transformers import PreTrainedModel

    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, PreTrainedModel) and type(o).__name__.endswith("ForCausalLM")]


class SeesTheTrainer:
    """Records the model and optimizer the Trainer trains, and how many causal LMs the run has made that are alive
    when it starts (a model an earlier test left for the collector does not count)."""

    def __init__(self):
        import weakref

        self.seen, self.before = {}, weakref.WeakSet(causal_lms())

    @molting.hookimpl
    def molting_trainer_callbacks(self, stage, config):
        from transformers import TrainerCallback

        seen, before = self.seen, self.before

        class Look(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
                seen["model"], seen["optimizer"] = model, optimizer
                seen["causal_lms"] = sum(o not in before for o in causal_lms())

        return [Look()]


@pytest.mark.parametrize("flags", [{}, {"lora_r": 4}, {"losses": {"sft": 1.0}}],
                         ids=["full", "lora", "reference-free"])
def test_gradient_checkpointing_trains_as_without(tmp_path, flags):
    plugin = "preference" if "losses" in flags else "dpo"
    without = short_run(tmp_path / "a", plugin, **flags)
    recorder = SeesTheTrainer()
    with_checkpointing = short_run(tmp_path / "b", plugin, recorder=recorder, gradient_checkpointing=True, **flags)
    model = recorder.seen["model"]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert base.is_gradient_checkpointing
    steps = [(a, b) for a, b in zip(without, with_checkpointing) if "loss" in a]
    assert len(steps) == 2
    for a, b in steps:
        assert close(a["loss"], b["loss"], 1e-5) and close(a["grad_norm"], b["grad_norm"], 1e-5)


def test_bfloat16_weights_train_and_lora_adapters_stay_float32(tmp_path):
    import torch

    recorder = SeesTheTrainer()
    records = short_run(tmp_path, recorder=recorder, dtype="bfloat16", lora_r=4)
    dtypes = {name: p.dtype for name, p in recorder.seen["model"].named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


def test_bfloat16_full_weights_train_and_save_in_bfloat16(tmp_path):
    from transformers import AutoModelForCausalLM

    records = short_run(tmp_path, dtype="bfloat16")
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    import torch

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert next(saved.parameters()).dtype == torch.bfloat16


def test_float16_full_weights_without_a_gpu_are_refused(tmp_path):
    from molting.errors import ConfigError

    with pytest.raises(ConfigError, match="--dtype float16 trains every weight in float16"):
        short_run(tmp_path, dtype="float16")


@pytest.mark.parametrize("optim, fused", [(None, True), ("adamw_torch", False)])
def test_adamw_is_fused_by_default_and_foreach_where_asked(tmp_path, optim, fused):
    recorder = SeesTheTrainer()
    records = short_run(tmp_path, recorder=recorder, **({"optim": optim} if optim else {}))
    optimizer = recorder.seen["optimizer"]
    inner = getattr(optimizer, "optimizer", optimizer)
    assert type(inner).__name__ == "AdamW"
    assert bool(inner.defaults.get("fused")) is fused
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


@pytest.mark.parametrize("optim, fused", [("adamw_torch_fused", True), ("adamw_torch", False)])
def test_a_stage_with_its_own_loop_builds_the_asked_adamw(optim, fused):
    import torch

    from molting.config import RunConfig
    from molting.training import make_optimizer

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = make_optimizer([weight], RunConfig(plugins=("ppo",), optim=optim))
    weight.grad = torch.ones(3)
    optimizer.step()
    assert optimizer.defaults["fused"] is fused
    assert torch.all(weight < 1)


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_hold_8bit_state(tmp_path, optim):
    import torch

    recorder = SeesTheTrainer()
    records = short_run(tmp_path, recorder=recorder, optim=optim)
    optimizer = recorder.seen["optimizer"]
    assert "bitsandbytes" in type(getattr(optimizer, "optimizer", optimizer)).__module__
    states = [s for s in getattr(optimizer, "optimizer", optimizer).state.values() if "state1" in s]
    assert states and any(s["state1"].dtype == torch.uint8 for s in states)
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


def test_an_8bit_optimizer_that_cannot_run_is_a_clear_error_before_loading(tmp_path, monkeypatch):
    import bitsandbytes

    from molting.errors import ModelError

    def broken(*args, **kwargs):
        raise RuntimeError("no 8-bit kernels for this device")

    monkeypatch.setattr(bitsandbytes.optim, "AdamW8bit", broken)
    with pytest.raises(ModelError, match="--optim adamw_8bit needs bitsandbytes' 8-bit optimizers working on this "
                                         "device, and a test step failed: no 8-bit kernels for this device"):
        short_run(tmp_path, optim="adamw_8bit")


def test_a_precomputed_reference_never_copies_the_model(tmp_path):
    held, precomputed = SeesTheTrainer(), SeesTheTrainer()
    short_run(tmp_path / "a", recorder=held)
    held.seen.pop("model"), held.seen.pop("optimizer")  # let the first run's models go
    short_run(tmp_path / "b", recorder=precomputed, precompute_ref=True)
    assert held.seen["causal_lms"] == 2  # the policy and its frozen copy
    assert precomputed.seen["causal_lms"] == 1  # the policy alone
