"""The demo GRPO run with each advantage estimator on several seeds: held-out greedy accuracy, reward, wall time.

    python benchmarks/advantages.py --seeds 0 1 2 [--estimators grpo rloo reinforce++ remax] [--steps 120]

Each run is `molting run --plugin grpo --advantage NAME --seed S` on the demo defaults (rule judge, 120 steps,
G = 8, 20 new tokens), one after another on this machine's cores; each trained model then answers the 256
held-out sums greedily (the figure tests/test_grpo.py asserts for the default estimator). Prints one row per
estimator: the median accuracy with its range over the seeds, the median of the last logged training reward
and of the run's wall time. docs/grpo.md quotes the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def accuracy(path: Path) -> float:
    from molting.demo import prompt_rows
    from molting.evaluation import generate, task_metrics
    from molting.models import load_causal_lm

    prompts = [r["prompt"] for r in prompt_rows("test")]
    model, tokenizer = load_causal_lm(path)
    return task_metrics(prompts, generate(model.eval(), tokenizer, prompts, temperature=0))["correct"]


def train(advantage: str, seed: int, steps: int, out: Path) -> tuple[float, float, float]:
    from molting.discovery import load_plugins
    from molting.pipeline import run
    from molting.resolve import resolve_config

    host = load_plugins()
    config, plan = resolve_config(host, ["grpo"], flags={"output_dir": str(out), "eval": "off", "seed": seed,
                                                          "advantage": advantage, "max_steps": steps,
                                                          "logging_steps": 10})
    started = time.perf_counter()
    run(config, plan, host)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in records if "reward" in r]
    return accuracy(out), statistics.fmean(rewards[-3:]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--estimators", nargs="+", default=["grpo", "rloo", "reinforce++", "remax"])
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    from molting.demo import demo_model_dir

    print(f"starting model: greedy held-out accuracy {accuracy(demo_model_dir()):.3f}", flush=True)
    print("| estimator | held-out accuracy, median (range) | training reward, last 30 steps | wall time |")
    print("| --- | --- | --- | --- |")
    for name in args.estimators:
        results = []
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                results.append(train(name, seed, args.steps, Path(tmp) / "run"))
        acc, reward, seconds = zip(*results)
        print(f"| `{name}` | {statistics.median(acc):.3f} ({min(acc):.3f}–{max(acc):.3f}) | "
              f"{statistics.median(reward):.3f} | {statistics.median(seconds):.0f} s |", flush=True)
        print("    seeds " + ", ".join(f"{s}: {a:.3f}" for s, a in zip(args.seeds, acc)), flush=True)


if __name__ == "__main__":
    main()
