"""The figures of docs/evaluation.md: `molting eval`'s wall time and peak memory on 256 held-out prompts, and the demo
PPO's reward hacking as the watch sees it.

    python benchmarks/evaluation.py [--repeats 3] [--skip-watch]

Each command runs as a user runs it (a subprocess, timed with its peak RSS from ``resource``); medians are printed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

WATCHED_PPO = {"plugin": "ppo", "eval": "off", "eval_prompts": 0, "eval_data": "demo-prompts", "eval_data_split": "test",
               "eval_judges": {"rule": 1.0}, "eval_steps": 16, "eval_temperature": 0, "eval_max_prompts": 256}


def molting(*args: str) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB, of this process alone: os.wait4) and stdout of ``python -m molting ARGS``."""
    import os

    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([sys.executable, "-m", "molting", *args], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if process.returncode:
            sys.exit(err.read()[-3000:])
        return seconds, usage.ru_maxrss / 1024, out.read()


def held_out_file(path: Path) -> Path:
    from molting import demo

    rows = []
    for pair in demo.preference_rows("test"):
        a, b = map(int, re.findall(r"\d+", pair["prompt"])[:2])
        rows.append({"prompt": pair["prompt"], "answer": str(a + b), "chosen": pair["chosen"], "rejected": pair["rejected"]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-watch", action="store_true")
    args = parser.parse_args()
    from molting.demo import demo_model_dir

    work = Path(tempfile.mkdtemp(prefix="molting-bench-eval-"))
    model = work / "dpo"
    molting("run", "--plugin", "dpo", "--epochs", "1", "--eval", "off", "--output-dir", str(model))
    data, start = held_out_file(work / "held256.jsonl"), str(demo_model_dir())
    cases = {
        "demo (256 prompts)": ["eval", "--model", str(model), "--json"],
        "jsonl, rule + llm-pairwise, 64 new tokens": [
            "eval", "--model", str(model), "--baseline", start, "--data", str(data), "--judge", "rule", "--judge-arg",
            "rule.column=answer", "--judge", "llm-pairwise", "--judge-arg", f"llm-pairwise.model={start}",
            "--max-new-tokens", "64", "--json"],
    }
    for name, command in cases.items():
        runs = [molting(*command) for _ in range(args.repeats)]
        report = json.loads(runs[-1][2])
        print(f"molting eval, {name}: median {statistics.median(r[0] for r in runs):.1f} s, peak RSS "
              f"{statistics.median(r[1] for r in runs):.0f} MB; win rate {report.get('win_rate', {}).get('mean')}, "
              f"ties {report.get('win_rate', {}).get('ties')}")
    if args.skip_watch:
        return
    recipe = work / "rlhf.yaml"
    recipe.write_text(yaml.safe_dump({"seed": 0, "output_dir": str(work / "rlhf"), "stages": [
        {"plugin": "sft", "eval": "off"}, {"plugin": "reward-model", "eval": "off"}, WATCHED_PPO]}))
    seconds, _, _ = molting("run", "--config", str(recipe))
    watch = json.loads((work / "rlhf" / "3-ppo" / "molting_run.json").read_text())["watch"]
    print(f"\nsft -> reward-model -> ppo, watched ({seconds:.0f} s):")
    print(f"{'step':>6} {'training reward':>16} {'held-out correct':>17} {'length':>7}")
    for e in watch["evaluations"]:
        reward = "-" if e["train_reward"] is None else f"{e['train_reward']:.3f}"
        print(f"{e['step']:>6} {reward:>16} {e['held_out']:>17.3f} {e['length']:>7.1f}")
    first: dict[str, dict] = {}
    for alarm in watch["alarms"]:
        first.setdefault(alarm["kind"], alarm)
    for alarm in first.values():
        print(f"alarm at step {alarm['step']}: {alarm['message']}")


if __name__ == "__main__":
    main()
