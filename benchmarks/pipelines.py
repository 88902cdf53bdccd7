"""Wall time, peak memory and effect of the built-in pipelines on the demo, each as one `molting run`.

    python benchmarks/pipelines.py            # sft -> reward-model -> ppo, and sft -> sample-pairs -> dpo

Each pipeline runs in a fresh process on the built-in defaults (evaluations included); the script prints
its wall time and peak RSS, each step's training time, PPO's seconds per step and held-out reward before
and after, and the demo metrics of the last step's before/after evaluation.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIPELINES = {
    "sft -> reward-model -> ppo": ["sft", "reward-model", "ppo"],
    "sft -> sample-pairs -> dpo": ["sft", "sample-pairs", "dpo"],
}


def run(plugins: list[str], out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one `molting run` in a child process."""
    args = [sys.executable, "-m", "molting", "run", "--output-dir", str(out)]
    for plugin in plugins:
        args += ["--plugin", plugin]
    start = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, plugins in PIPELINES.items():
            out = Path(tmp) / plugins[-1]
            wall, rss = run(plugins, out)
            print(f"{name}: {wall:.1f} s wall, peak RSS {rss:.0f} MB (largest child so far)")
            for index, plugin in enumerate(plugins, 1):
                record = json.loads((out / f"{index}-{plugin}" / "molting_run.json").read_text())
                metrics = record.get("metrics", {})
                shown = {k: metrics[k] for k in ("train_runtime", "seconds_per_step", "eval_accuracy", "pairs",
                                                 "eval_reward_before", "eval_reward_after",
                                                 "eval_judge_before", "eval_judge_after") if k in metrics}
                print(f"  {index}-{plugin}: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
                if "eval" in record and index == len(plugins):
                    before, after = record["eval"]["before"], record["eval"]["after"]
                    print("    held-out " + ", ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}"
                                                    for k in ("correct", "persona", "judge")))


if __name__ == "__main__":
    main()
