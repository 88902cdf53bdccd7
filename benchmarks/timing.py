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
