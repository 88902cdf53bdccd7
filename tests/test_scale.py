"""Scale and robustness: LoRA/QLoRA, precomputed reference, two processes, checkpoints and resume, NaN guard."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import molting
from conftest import run_molting
from molting import demo
from molting.discovery import load_plugins
from molting.errors import MoltingError
from molting.pipeline import run
from molting.resolve import resolve_config


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def eight_pairs(tmp_path_factory):
    """A fixed batch: 8 demo pairs, so every step sees the same data and the loss must fall."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo.preference_rows("train", 8)))
    return str(path)


def in_process(flags, *plugins):
    host = load_plugins(disabled=[])
    for index, plugin in enumerate(plugins):
        host.register(plugin, f"test-plugin-{index}")
    config, steps = resolve_config(host, ["dpo"], flags={"eval": "off", "logging_steps": 1, **flags})
    return run(config, steps, host)


# --------------------------------------------------------------------------- LoRA / QLoRA


def test_lora_uses_the_base_as_reference_and_writes_adapter_and_merged_model(tmp_path, demo_model):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    result = run_molting("run", "--plugin", "dpo", "--lora-r", "8", "--learning-rate", "1e-3", "--max-steps", "3",
                         "--merge", "--eval", "off", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reference model: the base model (adapter disabled)" in result.stderr
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == str(demo_model)
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(demo_model)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    with_adapter = AutoModelForCausalLM.from_pretrained(out / "adapter")  # transformers applies the adapter itself
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(with_adapter(ids).logits, merged(ids).logits, atol=1e-4)


class FourBitWatch:
    """Snapshots the 4-bit base weights when training starts and compares them when it ends."""

    def __init__(self):
        self.report = {}

    @molting.hookimpl
    def molting_trainer_callbacks(self, stage, config):
        from transformers import TrainerCallback

        watch = self

        class Watch(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                watch.before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" not in n}

            def on_train_end(self, args, state, control, model=None, **kwargs):
                after = {n: p.detach() for n, p in model.named_parameters() if "lora" not in n}
                quantized = [n for n, p in after.items() if p.dtype == torch.uint8]
                watch.report = {
                    "quantized": len(quantized),
                    "unchanged": all(torch.equal(watch.before[n], after[n]) for n in after),
                    "trainable": sorted({n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad}),
                }

        return [Watch()]


def test_qlora_trains_adapters_on_a_frozen_4bit_base(tmp_path, eight_pairs):
    watch = FourBitWatch()
    out = tmp_path / "qlora"
    in_process({"data": eight_pairs, "batch_size": 8, "max_steps": 4, "learning_rate": 2e-3, "lr_scheduler_type": "constant",
                "lora_r": 8, "load_in_4bit": True, "output_dir": str(out)}, watch)
    trajectory = losses(out)
    assert trajectory[-1] < trajectory[0] - 0.01
    assert watch.report["quantized"] >= 28  # every linear layer of the 4 blocks is NF4-packed uint8
    assert watch.report["unchanged"]
    assert watch.report["trainable"] == ["lora_A", "lora_B"]
    assert (out / "adapter_model.safetensors").exists()


def test_4bit_without_lora_is_refused_before_training(tmp_path):
    with pytest.raises(MoltingError, match="--load-in-4bit freezes the base model in 4 bits: give --lora-r"):
        in_process({"max_steps": 1, "load_in_4bit": True, "output_dir": str(tmp_path / "x")})


# --------------------------------------------------------------------------- reference


def test_precomputed_reference_gives_the_live_trajectory_and_is_cached(tmp_path):
    env = {"MOLTING_CACHE": str(tmp_path / "cache")}
    # parity to 1e-5 is a statement about fp32; bf16 autocast (the default on CPUs with native bf16) rounds more
    common = ["run", "--plugin", "dpo", "--max-steps", "6", "--logging-steps", "1", "--eval", "off", "--precision", "fp32"]
    live = run_molting(*common, "--output-dir", str(tmp_path / "live"), env=env)
    first = run_molting(*common, "--precompute-ref", "--output-dir", str(tmp_path / "pre"), env=env)
    second = run_molting(*common, "--precompute-ref", "--output-dir", str(tmp_path / "pre2"), env=env)
    for result in (live, first, second):
        assert result.returncode == 0, result.stderr[-2000:]
    assert "computed for 512 pairs, cached in" in first.stderr and "reusing" in second.stderr
    assert "reference model: precomputed (none held while training)" in first.stderr
    a, b, c = losses(tmp_path / "live"), losses(tmp_path / "pre"), losses(tmp_path / "pre2")
    assert len(a) == 6 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5 and b == c
    assert list((tmp_path / "cache" / "reference-logps").glob("*.safetensors"))


# --------------------------------------------------------------------------- two processes


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29534"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_follow_the_one_process_trajectory(tmp_path, launcher):
    import sys

    one = run_molting("run", "--plugin", "dpo", "--max-steps", "4", "--logging-steps", "1", "--eval", "off",
                      "--batch-size", "8", "--precision", "fp32", "--output-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    import os
    import subprocess

    two = subprocess.run(
        [sys.executable, *LAUNCHERS[launcher], "-m", "molting",
         "run", "--plugin", "dpo", "--max-steps", "4", "--logging-steps", "1", "--eval", "off", "--batch-size", "4",
         "--precision", "fp32", "--output-dir", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=600, env=os.environ.copy(),
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world size 2 (this is process 0)" in two.stderr and "world size 2 (this is process 1)" in two.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


# --------------------------------------------------------------------------- checkpoints and resume


class StopAt:
    """Ends training after ``step`` steps, as a crash would (without the final save being the point)."""

    def __init__(self, step):
        self.step = step

    @molting.hookimpl
    def molting_trainer_callbacks(self, stage, config):
        from transformers import TrainerCallback

        stop = self.step

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == stop:
                    control.should_training_stop = True

        return [Stop()]


def weights(out):
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def test_resume_gives_the_uninterrupted_result(tmp_path):
    flags = {"max_steps": 6, "save_steps": 2, "seed": 3}
    in_process({**flags, "output_dir": str(tmp_path / "straight")})
    in_process({**flags, "output_dir": str(tmp_path / "resumed")}, StopAt(3))  # checkpoint-2 is the last one
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-2"]
    in_process({**flags, "output_dir": str(tmp_path / "resumed"), "resume": "auto"})
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    la, lb = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(lb) == 6 and abs(la[-1] - lb[-1]) < 1e-5  # metrics.jsonl kept steps 1-2, then the resumed 3-6


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    from molting.training import MoltingTrainer

    original = MoltingTrainer._save_rng_state

    def crash_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("killed while saving")
        return original(self, output_dir)

    monkeypatch.setattr(MoltingTrainer, "_save_rng_state", crash_at_step_4)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        in_process({"max_steps": 6, "save_steps": 2, "output_dir": str(out)})
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    monkeypatch.setattr(MoltingTrainer, "_save_rng_state", original)
    in_process({"max_steps": 6, "save_steps": 2, "output_dir": str(out), "resume": "auto"})
    assert json.loads((out / "molting_run.json").read_text())["status"] == "completed"


def test_resume_from_a_path_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(MoltingError, match="not a checkpoint directory"):
        in_process({"max_steps": 1, "resume": str(tmp_path), "output_dir": str(tmp_path / "o")})


# --------------------------------------------------------------------------- non-finite guard


@pytest.mark.parametrize("bad, finite", [(None, True), (float("nan"), False), (float("inf"), False),
                                         (float("-inf"), False), ("inf-inf", False)])
def test_gradients_are_finite_sees_any_bad_value(bad, finite):
    import torch

    from molting.training import gradients_are_finite

    params = [torch.nn.Parameter(torch.ones(3, 5)), torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(2))]
    params[0].grad, params[1].grad = torch.ones(3, 5), torch.ones(4)  # params[2] has no gradient
    if bad == "inf-inf":  # a sum that cancels to NaN, not to a finite number
        params[0].grad[1, 2], params[0].grad[2, 4] = float("inf"), float("-inf")
    elif bad is not None:
        params[0].grad[2, 3] = bad
    assert gradients_are_finite(params) is finite


def test_gradients_are_finite_sums_half_precision_in_float32():
    import torch

    from molting.training import gradients_are_finite

    weight = torch.nn.Parameter(torch.ones(1000, dtype=torch.float16))
    weight.grad = torch.full((1000,), 60000.0, dtype=torch.float16)  # each finite; their float16 sum is not
    assert gradients_are_finite([weight])
    assert gradients_are_finite([torch.nn.Parameter(torch.ones(2))])  # no gradients at all


class NaNLoss:
    """A dpo variant whose loss is NaN on the listed calls (0-based)."""

    def __init__(self, bad_calls):
        self.bad_calls, self.calls = set(bad_calls), 0

    @molting.hookimpl
    def molting_register_losses(self, register):
        from molting.plugins.dpo import DPOParams, dpo_loss

        def flaky(inputs, params):
            out = dpo_loss(inputs, params)
            bad = self.calls in self.bad_calls or "all" in self.bad_calls
            self.calls += 1
            return attrs_evolve(out, losses=out.losses * math.nan) if bad else out

        register(molting.Loss(name="flaky", compute=flaky, params=DPOParams, description="NaN on some steps."))


def attrs_evolve(obj, **changes):
    import attrs

    return attrs.evolve(obj, **changes)


def run_flaky(tmp_path, bad_calls, capsys):
    host = load_plugins(disabled=[])
    host.register(NaNLoss(bad_calls), "flaky")
    config, steps = resolve_config(host, ["flaky"], flags={"max_steps": 4, "logging_steps": 1, "eval": "off",
                                                            "output_dir": str(tmp_path / "o")})
    return lambda: run(config, steps, host)


def test_a_nan_step_is_skipped_and_logged(tmp_path, capsys):
    run_flaky(tmp_path, {1}, capsys)()
    err = capsys.readouterr().err
    assert "step 2: non-finite loss on the examples [" in err
    assert "optimizer step skipped (1 in a row, at most 3)" in err
    assert json.loads((tmp_path / "o" / "molting_run.json").read_text())["status"] == "completed"


def test_repeated_nan_steps_stop_the_run(tmp_path, capsys):
    with pytest.raises(MoltingError, match=r"3 optimizer steps in a row were skipped \(the last: non-finite loss"):
        run_flaky(tmp_path, {"all"}, capsys)()


# --------------------------------------------------------------------------- padding-free batches


def test_padding_free_batches_give_the_padded_loss(demo_model):
    from molting.config import RunConfig
    from molting.losses import combine
    from molting.models import load_causal_lm
    from molting.pairs import PackedPairCollator, PairCollator, format_pairs, tokenize_pairs
    from molting.plugins.preference import build_trainer

    model, tokenizer = load_causal_lm(demo_model)
    rows = demo.preference_rows("test", 6)
    rows[0] = {**rows[0], "prompt": "Q: What is 1 + 2?\nQ: What is 3 + 4?\n" + rows[0]["prompt"]}  # mixed lengths
    examples = tokenize_pairs(format_pairs(rows, tokenizer, "demo"), tokenizer, 512, "drop")
    host = load_plugins(disabled=[])
    loss = combine([(host.get("loss", "dpo"), 1.0), (host.get("loss", "sft"), 0.5)])  # sft reads per-token log-probs
    params = loss.params(beta=0.1)
    padded, packed = PairCollator(tokenizer.pad_token_id)(examples), PackedPairCollator()(examples)
    assert packed["input_ids"].shape[0] == 1 and (packed["input_ids"] != tokenizer.pad_token_id).all()
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    import copy

    trainer = build_trainer(model, tokenizer, examples, RunConfig(plugins=["dpo"], precision="fp32"), loss, params, "unused",
                            ref_model=copy.deepcopy(model))
    trainer.model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        for p in model.parameters():  # a policy that differs from its reference
            p.add_(0.01 * torch.randn_like(p))
    a = trainer.compute_loss(trainer.model, padded).item()
    b = trainer.compute_loss(trainer.model, packed).item()  # SDPA: transformers masks the packed row itself
    assert abs(a - b) < 1e-5 and abs(a - math.log(2) - 0.5 * 0) > 1e-4
    from molting.packing import VARLEN_ATTENTION, use_varlen_attention

    assert use_varlen_attention(model) == VARLEN_ATTENTION and use_varlen_attention(trainer.ref_model)
    c = trainer.compute_loss(trainer.model, packed).item()  # one SDPA call per sequence
    assert abs(a - c) < 1e-5
    assert abs(trainer.compute_loss(trainer.model, padded).item() - a) < 1e-6  # padded batches are unchanged


def test_packed_sequences_do_not_attend_to_each_other(demo_model, tmp_path):
    from molting.models import load_causal_lm
    from molting.logps import packed_completion_logps
    from molting.packing import VARLEN_ATTENTION, pack, use_varlen_attention
    from molting.logps import completion_logps

    model, _ = load_causal_lm(demo_model)
    use_varlen_attention(model)
    first, second = [5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]
    sums, per_token, mask = packed_completion_logps(model, pack([first, second], [2, 3]))
    other, _, _ = packed_completion_logps(model, pack([[20, 21, 22, 23, 24, 25, 26, 27, 28], second], [2, 3]))
    assert abs(sums[1] - other[1]) < 1e-5 and abs(sums[0] - other[0]) > 1e-2
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    alone, token_logps, _ = completion_logps(model, torch.tensor([second]), torch.ones(1, 8, dtype=torch.long),
                                             torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))
    assert abs(sums[1] - alone[0]) < 1e-5 and torch.allclose(per_token[1], token_logps[0, -5:], atol=1e-5)
    model.save_pretrained(tmp_path)  # plain transformers must still load what a padding-free run saves
    assert VARLEN_ATTENTION not in (tmp_path / "config.json").read_text()


def test_padding_free_run_follows_the_padded_trajectory(tmp_path):
    flags = {"max_steps": 4, "precision": "fp32"}
    in_process({**flags, "output_dir": str(tmp_path / "padded")})
    in_process({**flags, "output_dir": str(tmp_path / "packed"), "padding_free": True})
    a, b = losses(tmp_path / "padded"), losses(tmp_path / "packed")
    assert len(a) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("native, faster", [(True, True), (True, False), (False, True), (False, False)])
def test_auto_precision_is_bf16_where_the_cpu_has_native_bf16_and_it_is_faster(monkeypatch, tmp_path, native, faster):
    from molting import training
    from molting.config import RunConfig
    from molting.training import training_arguments, uses_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(training, "cpu_bf16_is_faster", lambda: faster)
    chosen = native and faster
    assert uses_bf16("auto") is chosen
    assert uses_bf16("fp32") is False and uses_bf16("bf16") is True
    assert training_arguments(RunConfig(plugins=["dpo"]), tmp_path).bf16 is chosen
    assert training_arguments(RunConfig(plugins=["dpo"], precision="fp32"), tmp_path).bf16 is False


def test_the_bf16_timing_is_made_once_per_process():
    from molting.training import cpu_bf16_is_faster

    assert cpu_bf16_is_faster() is cpu_bf16_is_faster()
    assert cpu_bf16_is_faster.cache_info().hits >= 1


def test_the_run_says_which_precision_it_picked(tmp_path):
    result = run_molting("run", "--plugin", "dpo", "--max-steps", "1", "--eval", "off", "--precision", "bf16",
                         "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "device cpu, bf16 autocast," in result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_runs_keep_freed_memory_unless_malloc_is_tuned_already():
    import os
    import subprocess

    code = "from molting.cpu import keep_freed_memory; print(keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    tuned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**env, "MALLOC_ARENA_MAX": "2"})
    assert plain.stdout.strip() == "True" and tuned.stdout.strip() == "False"


def test_lora_adapters_start_from_the_runs_seed(tmp_path, demo_model):
    """--seed decides the adapters' random start, not whatever used the random state before in the process."""
    import torch

    from molting.config import RunConfig
    from molting.context import DataSource, StageContext, Step
    from molting.training import load_policy

    host = load_plugins(disabled=[])
    step = Step("dpo", host.get("stage", "preference"), host.get("loss", "dpo"))

    def adapters(noise_seed):
        torch.manual_seed(noise_seed)
        torch.rand(100)  # some earlier work drew from the global generator
        config = RunConfig(plugins=["dpo"], lora_r=4, seed=7)
        context = StageContext(config, step, None, demo_model, [], DataSource("rows"), tmp_path, host)
        model, _ = load_policy(context)
        return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_A" in n])

    assert torch.equal(adapters(1), adapters(2))


def test_the_shipped_fsdp_config_on_cpu_says_it_runs_plain_data_parallel(tmp_path):
    """accelerate shards only on GPUs and the like: on 2 CPU processes examples/accelerate/fsdp.yaml sets up
    MULTI_CPU (DDP). The run says so, and follows the one-process trajectory as DDP does."""
    import os
    import subprocess

    one = run_molting("run", "--plugin", "dpo", "--max-steps", "3", "--logging-steps", "1", "--eval", "off",
                      "--batch-size", "8", "--precision", "fp32", "--output-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    config = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "fsdp.yaml"
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
         "--mixed_precision", "no", "--main_process_port", "29535", "-m", "molting", "run", "--plugin", "dpo",
         "--max-steps", "3", "--logging-steps", "1", "--eval", "off", "--batch-size", "4", "--precision", "fp32",
         "--output-dir", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=600, env=os.environ.copy(),
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "fp32, DDP," in two.stderr
    assert "the launcher asked for FSDP, but accelerate set up MULTI_CPU" in two.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5
