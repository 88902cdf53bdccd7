"""Faults in a run: non-finite losses and weights, losses of the wrong shape, hyperparameters that cannot be finite.

Broken losses (``broken_losses.py``) are registered the way a third-party
plugin registers its own and trained on the demo model.
"""

from __future__ import annotations

import json
import math
import os

import pytest

import molting
from broken_losses import BROKEN
from molting.errors import ConfigError, DiskFullError, MoltingError, PluginError


class Broken:
    @molting.hookimpl
    def molting_register_losses(self, register):
        for name in ("nan", "reduced"):
            register(BROKEN[name][0])


def run_dpo(tmp_path, plugin="dpo", **flags):
    from molting.discovery import load_plugins
    from molting.pipeline import run
    from molting.resolve import resolve_config

    host = load_plugins()
    host.register(Broken(), "broken")
    out = tmp_path / "out"
    settings = {"output_dir": str(out), "max_steps": 2, "logging_steps": 1, "eval": "off", "batch_size": 4,
                "precision": "fp32", **flags}
    config, steps = resolve_config(host, [plugin], flags=settings)
    run(config, steps, host)
    return out


def test_a_loss_nan_for_some_examples_skips_the_step_names_them_and_logs_nan(tmp_path, capsys):
    """The loss is NaN for the first example of each batch only: its gradients are finite, the step is not."""
    with pytest.raises(MoltingError, match=r"2 optimizer steps in a row were skipped \(the last: non-finite loss on "
                                           r"the examples \[\d+\]\)"):
        run_dpo(tmp_path, "nan", max_skipped_steps=2, max_steps=4)
    err = capsys.readouterr().err
    assert "step 1: non-finite loss on the examples [" in err and "optimizer step skipped (1 in a row, at most 2)" in err
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert math.isnan(logged[0]["loss"])  # not hidden as 0.0
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_skipped_step_leaves_the_weights_alone(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from molting.demo import demo_model_dir

    out = run_dpo(tmp_path, "nan", max_skipped_steps=9, max_steps=2)
    start = AutoModelForCausalLM.from_pretrained(demo_model_dir()).state_dict()
    end = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(start[name], end[name]) for name in start)


def test_a_loss_that_reduces_the_batch_is_refused_in_the_run(tmp_path):
    with pytest.raises(PluginError, match=r"loss 'reduced': losses has shape \(\) for a batch of 4; expected \(4,\)\. "
                                          r"Return one loss per example"):
        run_dpo(tmp_path, "reduced")


def test_weights_that_turn_non_finite_stop_the_run_before_anything_is_saved(tmp_path):
    """1e39 is a finite float64 but not a float32: the first AdamW step writes inf into the weights."""
    with pytest.raises(MoltingError, match="step 1 left non-finite weights .* stopping without saving them"):
        run_dpo(tmp_path, learning_rate=1e39)
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_a_learning_rate_that_is_not_finite_is_refused(tmp_path, value):
    from molting.discovery import load_plugins
    from molting.resolve import resolve_config

    with pytest.raises(ConfigError, match=f"learning_rate.*expected a finite number, got {value!r}"):
        resolve_config(load_plugins(), ["dpo"], flags={"learning_rate": value})


@pytest.mark.parametrize("flags, message", [
    ({"beta": float("inf")}, "loss 'dpo': beta must be a finite number, got inf"),
    ({"losses": {"dpo": 1.0, "sft": float("nan")}}, "must map loss names to finite numeric weights"),
    ({"judges": {"rule": float("inf")}}, "the weight of 'rule' must be a finite number"),
])
def test_loss_settings_and_weights_that_are_not_finite_are_refused(flags, message):
    from molting.discovery import load_plugins
    from molting.resolve import make_loss_params, resolve_config

    with pytest.raises(ConfigError, match=message):
        config, steps = resolve_config(load_plugins(), ["dpo"], flags=flags)
        make_loss_params(steps[0], config)


# --------------------------------------------------------------------------- the output directory


def sft(tmp_path, plugin=None, **flags):
    from molting.discovery import load_plugins
    from molting.pipeline import run
    from molting.resolve import resolve_config

    host = load_plugins()
    if plugin is not None:
        host.register(plugin, "watch")
    settings = {"output_dir": str(tmp_path / "out"), "max_steps": 2, "logging_steps": 1, "eval": "off",
                "batch_size": 4, "precision": "fp32", **flags}
    config, steps = resolve_config(host, ["sft"], flags=settings)
    return run(config, steps, host)


@pytest.mark.parametrize("below", [False, True])
def test_an_output_dir_that_is_a_file_or_below_one_is_a_one_line_error(tmp_path, below):
    (tmp_path / "taken").write_text("not a directory")
    out = tmp_path / "taken" / "out" if below else tmp_path / "taken"
    message = "lies below .*taken, which is a file" if below else "is a file: give a directory"
    with pytest.raises(ConfigError, match=message):
        sft(tmp_path, output_dir=str(out))


def test_a_second_run_into_a_run_s_directory_is_refused_unless_overwrite(tmp_path):
    sft(tmp_path, save_steps=1)
    with pytest.raises(ConfigError, match=r"holds a completed run \(checkpoints checkpoint-1, checkpoint-2\): continue "
                                          r"it with --resume auto, replace it with --overwrite"):
        sft(tmp_path, learning_rate=1e-3)
    sft(tmp_path, learning_rate=1e-3, overwrite=True)
    record = json.loads((tmp_path / "out" / "molting_run.json").read_text())
    assert record["config"]["learning_rate"] == 1e-3 and not list((tmp_path / "out").glob("checkpoint-*"))


def test_resume_refuses_a_run_of_other_settings_naming_them(tmp_path):
    sft(tmp_path, save_steps=1)
    with pytest.raises(ConfigError, match=r"--resume: .* holds a run with other settings \(learning_rate: 5e-05 then, "
                                          r"0.001 now\)"):
        sft(tmp_path, learning_rate=1e-3, resume="auto")


def test_a_failed_run_may_be_retried_in_place(tmp_path):
    out = tmp_path / "out"
    sft(tmp_path)
    record = json.loads((out / "molting_run.json").read_text())
    (out / "molting_run.json").write_text(json.dumps({**record, "status": "failed"}))
    sft(tmp_path)  # the same settings: its own leftovers
    (out / "molting_run.json").write_text(json.dumps({**record, "status": "failed"}))
    sft(tmp_path, learning_rate=1e-3)  # other settings, but the failed run left no checkpoint: nothing to lose


def test_resuming_from_a_checkpoint_at_max_steps_trains_nothing_more(tmp_path):
    """As after a kill during the final save: the last checkpoint is the result, no step is added."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "out"
    sft(tmp_path, save_steps=2)
    (out / "model.safetensors").unlink()
    steps_before = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    sft(tmp_path, save_steps=2, resume="auto")
    steps_after = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps_after if s is not None) == 2 == max(steps_before)
    result, checkpoint = load_file(out / "model.safetensors"), load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(result[name], checkpoint[name]) for name in checkpoint)


def test_a_directory_another_live_process_writes_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".molting.lock").write_text(f"{other.pid}@{socket.gethostname()}")
        with pytest.raises(ConfigError, match=rf"is being written by process {other.pid}@"):
            sft(tmp_path)
    finally:
        other.kill()
        other.wait()
    seen = []

    class Watch:
        @molting.hookimpl
        def molting_before_stage(self, stage, config):
            seen.append((out / ".molting.lock").read_text())

    sft(tmp_path, plugin=Watch())  # that process is gone: its lock is stale, and taken over
    assert seen == [f"{os.getpid()}@{socket.gethostname()}"]
    assert not (out / ".molting.lock").exists() and (out / "model.safetensors").exists()


def test_a_crash_during_the_final_save_leaves_no_half_model_and_a_resume_finishes_it(tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    out = tmp_path / "out"
    save = PreTrainedTokenizerBase.save_pretrained

    def crash(self, directory, *args, **kwargs):
        if ".staging-final" in str(directory):
            raise OSError(28, "No space left on device")
        return save(self, directory, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", crash)
    with pytest.raises(DiskFullError, match=r"the disk is full: writing the model in .*out failed \(No space left on "
                                            r"device\); nothing half-written is kept and checkpoint-2 is whole\. Free "
                                            r"space, then rerun with --resume auto"):
        sft(tmp_path, save_steps=2)
    assert not (out / "model.safetensors").exists()  # the weights were written, but into the staging folder
    assert not (out / ".staging-final").exists()  # and that is gone: the space it held is what was missing
    assert json.loads((out / "molting_run.json").read_text())["status"] == "failed"
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", save)
    sft(tmp_path, save_steps=2, resume="auto")
    assert (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()
    assert not (out / ".staging-final").exists()
    assert json.loads((out / "molting_run.json").read_text())["status"] == "completed"


def test_a_full_disk_while_a_checkpoint_is_written_is_a_clear_error_and_the_last_checkpoint_stays_whole(
        tmp_path, monkeypatch):
    import errno

    from transformers import AutoModelForCausalLM

    from molting.training import RunLoss

    out = tmp_path / "out"
    save = RunLoss.save

    def full(self, checkpoint, total):
        if checkpoint.endswith("checkpoint-4"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(self, checkpoint, total)

    monkeypatch.setattr(RunLoss, "save", full)
    with pytest.raises(DiskFullError, match=r"writing checkpoint-4 in .*out failed \(No space left on device\); "
                                            r"nothing half-written is kept and checkpoint-2 is whole"):
        sft(tmp_path, save_steps=2, max_steps=4)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")
    assert json.loads((out / "molting_run.json").read_text())["status"] == "failed"
    monkeypatch.setattr(RunLoss, "save", save)
    sft(tmp_path, save_steps=2, max_steps=4, resume="auto")  # space freed: the run continues from checkpoint-2
    assert json.loads((out / "molting_run.json").read_text())["status"] == "completed"


def test_a_running_record_names_its_process_and_keeps_a_heartbeat(tmp_path, monkeypatch):
    import itertools
    import socket

    import molting.training
    from molting.training import Heartbeat

    seen = []

    class Watch:
        @molting.hookimpl
        def molting_on_log(self, metrics, step):
            if "loss" in metrics:  # a step's log (not the summary at the end)
                seen.append(json.loads((tmp_path / "out" / "molting_run.json").read_text()))

    clock = itertools.count(1)
    monkeypatch.setattr(Heartbeat, "interval", 0.0)  # a beat at every step
    monkeypatch.setattr(molting.training, "now_utc", lambda: f"2026-12-03T00:00:{next(clock):02d}+00:00")
    sft(tmp_path, plugin=Watch(), max_steps=3)
    running = [r for r in seen if r["status"] == "running"]
    assert len(running) == 3
    assert all(r["pid"] == os.getpid() and r["host"] == socket.gethostname() for r in running)
    beats = [r["heartbeat"] for r in running]
    assert beats == sorted(beats) and len(set(beats)) == len(beats)  # a fresh beat at each step
    assert json.loads((tmp_path / "out" / "molting_run.json").read_text())["status"] == "completed"


class CrashAt:
    """A plugin whose trainer callback raises at one step: a crash mid-run."""

    def __init__(self, step):
        self.step = step

    @molting.hookimpl
    def molting_trainer_callbacks(self, stage, config):
        from transformers import TrainerCallback

        step = self.step

        class Crash(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    raise RuntimeError(f"crash at step {step}")

        return [Crash()]


def test_after_a_resume_the_summary_loss_covers_the_whole_run(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    sft(whole, max_steps=4, save_steps=2)
    expected = json.loads((whole / "out" / "molting_run.json").read_text())["metrics"]["train_loss"]
    with pytest.raises(RuntimeError, match="crash at step 3"):
        sft(tmp_path, plugin=CrashAt(3), max_steps=4, save_steps=2)
    sft(tmp_path, max_steps=4, save_steps=2, resume="auto")
    record = json.loads((tmp_path / "out" / "molting_run.json").read_text())
    assert record["metrics"]["train_loss"] == pytest.approx(expected, rel=1e-5)
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    summaries = [line for line in lines if "train_loss" in line]
    assert len(summaries) == 1 and summaries[0]["train_loss"] == pytest.approx(expected, rel=1e-5)
    assert [line["step"] for line in lines if "train_loss" not in line] == [1, 2, 3, 4]  # each step once
