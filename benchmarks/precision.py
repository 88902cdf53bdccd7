"""bf16 autocast against fp32 on this machine's CPU, and what ``--precision auto`` picks.

    python benchmarks/precision.py [--repeats 3] [--sizes 768 2048]

Times a square matrix product in fp32 and under bf16 autocast (medians of 9 after a warm-up), then trains the
default ``molting run --plugin dpo`` (the demo model) once per precision and repeat, each in a fresh process,
alternating, and prints the medians of ``train_runtime`` and of the wall time with their bf16/fp32 ratios.
docs/scaling.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def matmul_ms(size: int, bf16: bool, repeats: int = 9) -> float:
    from molting.training import cpu_matmul_seconds

    return cpu_matmul_seconds(size, bf16, repeats) * 1e3


def dpo_run(precision: str, scratch: Path) -> dict[str, float]:
    out = scratch / f"dpo-{precision}-{time.monotonic_ns()}"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "molting", "run", "--plugin", "dpo", "--precision", precision,
                    "--output-dir", str(out)], check=True, capture_output=True)
    wall = time.perf_counter() - started
    record = json.loads((out / "molting_run.json").read_text())
    return {"train": record["metrics"]["train_runtime"], "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[768, 2048])
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    from molting.training import uses_bf16

    print(f"--precision auto picks {'bf16 autocast' if uses_bf16('auto') else 'fp32'} here")
    for size in args.sizes:
        fp32, bf16 = matmul_ms(size, False), matmul_ms(size, True)
        print(f"{size}x{size} product: fp32 {fp32:.1f} ms, bf16 autocast {bf16:.1f} ms, bf16/fp32 {bf16 / fp32:.2f}")
    runs: dict[str, list[dict[str, float]]] = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.repeats):
            for precision in runs:
                runs[precision].append(dpo_run(precision, Path(scratch)))
    for key in ("train", "wall"):
        medians = {p: statistics.median(r[key] for r in rows) for p, rows in runs.items()}
        print(f"molting run --plugin dpo, {key} s (median of {args.repeats}): fp32 {medians['fp32']:.1f}, "
              f"bf16 {medians['bf16']:.1f}, bf16/fp32 {medians['bf16'] / medians['fp32']:.2f}")


if __name__ == "__main__":
    main()
