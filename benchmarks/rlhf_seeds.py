"""The shortened RLHF recipe of tests/test_rlhf_pipeline.py on several seeds: how far PPO moves the held-out scores.

    python benchmarks/rlhf_seeds.py --seeds 0 1 2

For each seed it runs sft (16 steps) -> reward-model (48) -> ppo (40) and prints the reward model's held-out
pair accuracy and PPO's held-out figures before -> after: the reward model's mean reward, the demo judge's
score, correctness and persona rate of sampled answers. The test's thresholds come from these numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_rlhf_pipeline import rlhf  # noqa: E402  (the test's recipe, run through the CLI)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            out, _ = rlhf(Path(tmp), seed)
            ppo = json.loads((out / "3-ppo" / "molting_run.json").read_text())["metrics"]
            accuracy = json.loads((out / "2-reward-model" / "molting_run.json").read_text())["metrics"]["eval_accuracy"]
        moves = ", ".join(f"{name} {ppo[f'eval_{name}_before']:.3f} -> {ppo[f'eval_{name}_after']:.3f}"
                          for name in ("reward", "judge", "correct", "persona"))
        print(f"seed {seed}: reward-model accuracy {accuracy:.3f}; {moves}", flush=True)


if __name__ == "__main__":
    main()
