"""ppo and grpo on two CPU processes (gloo) follow the one-process run with the same global batch.

One process takes the whole batch; two take half each (``--batch-size`` is per process). Each completion
draws from a random stream of its own (``molting.sampling.completion_seeds``: the run's seed, the step,
its place in the global batch), the advantages are computed over every process's rollouts, and the losses
are normalised over the global batch, so the two runs log the same metrics and end with the same weights
(1e-5). A judge that records who called it shows the scoring sharded: each process judges its own
completions, and together they judge exactly what one process judges.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_molting

LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29551"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29552"],
}
JUDGE = '''
import os

def counted(prompts, completions, answer):
    with open(os.environ["CALLS_FILE"], "a") as f:
        f.write(f"{os.environ.get('RANK', '0')} {len(completions)}\\n")
    return [float(c.strip().split()[-1:] == [a]) if c.strip() else 0.0 for c, a in zip(completions, answer)]
'''
# per stage: the global batch (as settings for one process; two take half), what to compare in metrics.jsonl
STAGES = {
    "grpo": ({"--batch-size": 16, "--set": "num_generations=4"}, ("reward", "reward_std", "grad_norm", "entropy",
                                                                 "completions/mean_length")),
    "ppo": ({"--batch-size": 8}, ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg",
                                  "policy/approxkl_avg", "val/clipfrac_avg")),
}


def _run(tmp_path: Path, stage: str, out: str, processes: int, launcher: str | None = None):
    settings, _ = STAGES[stage]
    args = ["run", "--plugin", stage, "--max-steps", "3", "--logging-steps", "1", "--eval", "off",
            "--precision", "fp32", "--judge", "python", "--set", "judge_args={python: {function: 'counting:counted'}}",
            "--output-dir", str(tmp_path / out)]
    for flag, value in settings.items():
        args += [flag, str(value // processes if flag == "--batch-size" else value)]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "CALLS_FILE": str(tmp_path / f"{out}.calls")}
    if launcher is None:
        result = run_molting(*args, env=env)
    else:
        result = subprocess.run([sys.executable, *LAUNCHERS[launcher], "-m", "molting", *args], capture_output=True,
                                text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
    calls = [line.split() for line in (tmp_path / f"{out}.calls").read_text().splitlines()]
    return records, calls, result.stderr


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_two_processes_follow_the_one_process_trajectory(tmp_path, stage, launcher):
    (tmp_path / "counting.py").write_text(JUDGE)
    one, one_calls, _ = _run(tmp_path, stage, "one", 1)
    two, two_calls, stderr = _run(tmp_path, stage, "two", 2, launcher)
    assert "world size 2 (this is process 1)" in stderr
    _, compared = STAGES[stage]
    steps = [(a, b) for a, b in zip(one, two) if compared[0] in a]
    assert len(steps) == 3
    for a, b in steps:
        for name in compared:
            assert b[name] == pytest.approx(a[name], abs=1e-5), (a["step"], name)
    for name, tensor in _weights(tmp_path / "one").items():
        torch.testing.assert_close(_weights(tmp_path / "two")[name], tensor, atol=1e-5, rtol=0, msg=name)
    judged = lambda calls: sum(int(n) for _, n in calls)  # noqa: E731
    assert judged(two_calls) == judged(one_calls)  # every completion judged once, none twice
    assert {rank for rank, _ in two_calls} == {"0", "1"}  # by the process that sampled it
