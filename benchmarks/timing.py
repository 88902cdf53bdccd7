"""A Trainer callback that times each optimizer step and keeps one logged metric, shared by the benchmarks."""

from __future__ import annotations

import time


def step_timer(metric: str):
    """A callback with ``times`` (seconds per step) and ``values`` (each log's ``metric``)."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start, self.values = [], None, []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and metric in logs:
                self.values.append(logs[metric])

    return Timer()


def run_worker_process(script: str, name: str, args: list[str]) -> dict:
    """Run ``script --worker ...`` in a fresh process (its own peak RSS) and parse the JSON its last line prints."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
