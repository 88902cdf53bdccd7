"""Kills at every write point: a real ``molting run`` process gets SIGKILL while it writes a checkpoint, the final
model, the evaluation, or a pipeline's second step; the rerun ends with a complete, consistent output directory.

Each killed run is ``molting``'s own CLI with one function wrapped so that the process kills itself (``SIGKILL``,
nothing flushed, no handler run) when that function is called on the path named, or for the Nth time: the state
on disk is what a kill at that moment leaves. The online stages, PPO (its own loop) and GRPO (a Trainer), are
killed mid-run, between checkpoints, and resumed: they follow the uninterrupted run, sampling included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import run_molting

KILL_AT = textwrap.dedent("""
    import importlib, os, signal, sys

    module, owner, name, marker = sys.argv[1:5]
    target = importlib.import_module(module)
    for part in filter(None, owner.split(".")):
        target = getattr(target, part)
    original = getattr(target, name)

    calls = 0

    def killed(*args, **kwargs):  # marker "#N": at the Nth call; else at a call whose arguments show the marker
        global calls
        calls += 1
        if (marker.startswith("#") and calls == int(marker[1:])) or (not marker.startswith("#")
                                                                      and marker in repr(args) + repr(kwargs)):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(target, name, killed)
    from molting.cli import main

    sys.argv = ["molting", *sys.argv[5:]]
    main()
""")

SFT = ("run", "--plugin", "sft", "--max-steps", "4", "--batch-size", "4", "--logging-steps", "1",
       "--precision", "fp32")


def killed_run(where: tuple[str, str, str, str], *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", KILL_AT, *where, *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    return done


def record(directory) -> dict:
    return json.loads((directory / "molting_run.json").read_text())


def assert_complete(directory, steps: int) -> None:
    from transformers import AutoModelForCausalLM

    assert record(directory)["status"] == "completed"
    assert not list(directory.glob(".staging-*"))
    AutoModelForCausalLM.from_pretrained(directory)  # the model reloads with plain transformers
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in records if "train_runtime" not in r]  # every step's log, not the run's summary
    assert logged == list(range(1, steps + 1))  # every step once


def assert_killed(directory) -> None:
    left = record(directory)
    assert left["status"] == "running" and left["heartbeat"] >= left["started"]
    with pytest.raises(ProcessLookupError):
        os.kill(left["pid"], 0)  # the record names a process that is gone: it was killed


def test_a_kill_while_a_checkpoint_is_written_keeps_the_last_one_whole_and_the_resume_follows_the_whole_run(
        tmp_path):
    import torch
    from safetensors.torch import load_file

    whole, out = tmp_path / "whole", tmp_path / "out"
    assert run_molting(*SFT, "--save-steps", "2", "--output-dir", str(whole)).returncode == 0
    killed_run(("molting.training", "RunLoss", "save", "checkpoint-4"), *SFT, "--save-steps", "2",
               "--output-dir", str(out))
    assert_killed(out)
    assert (out / ".staging-checkpoint-4").is_dir() and not (out / "checkpoint-4").exists()
    assert (out / "checkpoint-2" / "model.safetensors").exists()
    resumed = run_molting(*SFT, "--save-steps", "2", "--output-dir", str(out), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    assert_complete(out, 4)
    ours, theirs = load_file(out / "model.safetensors"), load_file(whole / "model.safetensors")
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in theirs)


def test_a_kill_during_the_final_save_leaves_no_half_model_and_the_resume_only_saves(tmp_path):
    out = tmp_path / "out"
    killed_run(("transformers", "PreTrainedTokenizerBase", "save_pretrained", ".staging-final"), *SFT,
               "--save-steps", "4", "--output-dir", str(out))
    assert_killed(out)
    assert not (out / "model.safetensors").exists() and (out / ".staging-final" / "model.safetensors").exists()
    resumed = run_molting(*SFT, "--save-steps", "4", "--output-dir", str(out), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "nothing left to train" in resumed.stderr
    assert_complete(out, 4)


def test_a_kill_during_evaluation_leaves_the_run_unfinished_and_a_rerun_completes_it(tmp_path):
    out = tmp_path / "out"
    args = (*SFT, "--eval", "on", "--output-dir", str(out))
    killed_run(("molting.pipeline", "", "_evaluate", ""), *args)
    assert_killed(out)  # the model is saved, but the run is not complete without its evaluation and card
    assert (out / "model.safetensors").exists() and not (out / "README.md").exists()
    rerun = run_molting(*args)  # the same run again: its own leftovers, no --resume or --overwrite needed
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_complete(out, 4)
    assert "eval" in record(out) and (out / "README.md").exists()


def test_a_kill_in_a_pipeline_s_second_step_reruns_that_step_only(tmp_path):
    out = tmp_path / "out"
    args = ("run", "--plugin", "sft", "--plugin", "dpo", "--max-steps", "2", "--batch-size", "4", "--eval", "off",
            "--precision", "fp32", "--logging-steps", "1", "--output-dir", str(out))
    killed_run(("transformers", "PreTrainedTokenizerBase", "save_pretrained", "2-dpo"), *args)
    first = out / "1-sft"
    assert record(first)["status"] == "completed"
    assert_killed(out / "2-dpo")
    saved = (first / "model.safetensors").stat().st_mtime_ns
    rerun = run_molting(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (first / "model.safetensors").stat().st_mtime_ns == saved  # step 1 is complete: skipped, not retrained
    assert_complete(first, 2)
    assert_complete(out / "2-dpo", 2)


ONLINE = {
    "ppo": (("molting.plugins.ppo", "", "rollout", "#3"),
            ("--judge", "demo-rule", "--set", "num_mini_batches=2", "--set", "num_ppo_epochs=2")),
    "grpo": (("molting.plugins.grpo.trainer", "GRPOTrainer", "generate_and_score", "#3"),
             ("--judge", "demo-rule", "--set", "num_generations=4")),
}


@pytest.mark.parametrize("stage", sorted(ONLINE))
def test_an_online_stage_killed_mid_run_resumes_on_the_uninterrupted_trajectory(tmp_path, stage):
    """Killed at step 3's sampling, after the checkpoint of step 2: ``--resume auto`` samples the same completions
    (the random state is in the checkpoint) and ends with the same weights and the same logged figures."""
    from safetensors.torch import load_file

    where, flags = ONLINE[stage]
    args = ("run", "--plugin", stage, "--max-steps", "4", "--batch-size", "4", "--logging-steps", "1",
            "--save-steps", "2", "--eval", "off", "--precision", "fp32", *flags)
    whole, out = tmp_path / "whole", tmp_path / "out"
    done = run_molting(*args, "--output-dir", str(whole))
    assert done.returncode == 0, done.stderr[-3000:]
    killed_run(where, *args, "--output-dir", str(out))
    assert_killed(out)
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    resumed = run_molting(*args, "--output-dir", str(out), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert_complete(out, 4)
    ours, theirs = load_file(out / "model.safetensors"), load_file(whole / "model.safetensors")
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) < 1e-5
    logged = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (out, whole)]
    for mine, uninterrupted in zip(*logged):
        for name, value in uninterrupted.items():
            if isinstance(value, float) and "runtime" not in name and "per_second" not in name and "time" not in name:
                assert mine[name] == pytest.approx(value, abs=1e-5), (name, mine["step"])
