"""On-policy vs off-policy DPO on the demo task, with the same number of DPO steps.

off-policy: the shipped demo pairs (``demo-preference``: hand-written chosen and rejected answers).
on-policy:  ``sample-pairs`` draws N answers per demo prompt from the starting model, the judge ranks
            them, and DPO trains on best vs worst.

Both start from the built-in model, train ``--steps`` DPO steps with the demo defaults, and are
evaluated on the held-out split (greedy correctness, persona rate and judge score of sampled answers).

    python benchmarks/onpolicy_vs_offpolicy.py --steps 150 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "molting", "run", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--judge", default="demo-rule")
    options = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"off-policy": [], "on-policy": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in options.seeds:
            common = ["--max-steps", str(options.steps), "--seed", str(seed), "--eval", "on"]
            off = Path(tmp) / f"off-{seed}"
            run(["--plugin", "dpo", "--output-dir", str(off), *common])
            on = Path(tmp) / f"on-{seed}"
            run(["--plugin", "sample-pairs", "--plugin", "dpo", "--judge", options.judge, "--output-dir", str(on), *common])
            for name, record in (("off-policy", off / "molting_run.json"), ("on-policy", on / "2-dpo" / "molting_run.json")):
                data = json.loads(record.read_text())
                results[name].append({"before": data["eval"]["before"], "after": data["eval"]["after"]})
    metrics = ("correct", "persona", "judge")
    print(f"{options.steps} DPO steps, seeds {options.seeds}, medians (before -> after)")
    print(f"{'':<12}" + "".join(f"{m:>20}" for m in metrics))
    for name, runs in results.items():
        cells = []
        for m in metrics:
            before = statistics.median(r["before"][m] for r in runs)
            after = statistics.median(r["after"][m] for r in runs)
            cells.append(f"{before:.3f} -> {after:.3f}")
        print(f"{name:<12}" + "".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
