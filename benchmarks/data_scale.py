"""Loading and tokenizing preference pairs at scale: molting's preference stage against trl's DPOTrainer.

    python benchmarks/data_scale.py [--sizes 10000 100000 1000000]
    DATA_SCALE_NUM_PROC=2 python benchmarks/data_scale.py   # both map with 2 processes

For each size a JSONL file of pairs (~30-token prompts, ~100-token answers,
the demo task's words) is written once; then, each in a fresh process with
an empty datasets cache (no run reuses another's work), molting reads,
checks, formats and tokenizes it as its preference stage does before
training (``read_data``, ``format_pairs``, ``tokenize_pairs``), and trl's
DPOTrainer is built on it (``load_dataset("json")`` and the trainer's own
preparation: prompt handling, EOS, tokenizing with ``Dataset.map``). Both
use the demo model's tokenizer. Each prints rows per second and the
process's peak RSS, and runs a second time on the first run's datasets
cache (what a rerun on the same data costs); the last lines are the
ratios at each size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

WORDS = "the sum of plus is arr matey be one two three four five six seven eight nine ten and so it".split()


def make_data(path: Path, rows: int) -> None:
    rng = random.Random(rows)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    with path.open("w") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"prompt": f"Q: {text(25)}\nA:", "chosen": " " + text(90),
                                     "rejected": " " + text(90)}) + "\n")


def worker_molting(path: str) -> int:
    from transformers import AutoTokenizer

    from molting.data import read_data
    from molting.demo import demo_model_dir
    from molting.pairs import format_pairs, tokenize_pairs

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    pairs = format_pairs(read_data(path), tokenizer, path, num_proc=NUM_PROC)
    return len(tokenize_pairs(pairs, tokenizer, 1024, "truncate", path, num_proc=NUM_PROC))


def worker_trl(path: str) -> int:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from molting.demo import demo_model_dir

    dataset = datasets.load_dataset("json", data_files=path, split="train")
    with tempfile.TemporaryDirectory() as out:
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(demo_model_dir()), train_dataset=dataset,
                             args=DPOConfig(output_dir=out, use_cpu=True, report_to=[], max_length=1024,
                                            dataset_num_proc=NUM_PROC),
                             processing_class=AutoTokenizer.from_pretrained(demo_model_dir()))
        return len(trainer.train_dataset)


WORKERS = {"molting": worker_molting, "trl": worker_trl}
NUM_PROC = int(os.environ.get("DATA_SCALE_NUM_PROC", "0")) or None


def run_worker(trainer: str, path: Path, cache: str) -> dict:
    import subprocess

    env = {**os.environ, "HF_DATASETS_CACHE": cache, "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, __file__, "--worker", trainer, "--data", str(path)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{trainer} on {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--data")
    args = parser.parse_args()
    if args.worker:
        start = time.perf_counter()
        rows = WORKERS[args.worker](args.data)
        seconds = time.perf_counter() - start
        print(json.dumps({"rows": rows, "seconds": seconds,
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            path = Path(tmp) / f"pairs-{size}.jsonl"
            make_data(path, size)
            for trainer in WORKERS:
                with tempfile.TemporaryDirectory(dir=tmp) as cache:  # empty: nothing reused from another run
                    for run in ("first", "cached"):  # the second run finds the first one's datasets cache
                        result = results[(trainer, size, run)] = run_worker(trainer, path, cache)
                        print(f"{trainer:<8} {size:>9} rows, {run:<6}: {result['seconds']:>7.1f} s "
                              f"({result['rows'] / result['seconds']:>8.0f} rows/s), {result['peak_rss_mb']:>7.0f} MB",
                              file=sys.stderr, flush=True)
            path.unlink()
    print(f"\n{'rows':>9} {'trainer':<8} {'rows/s':>9} {'peak RSS MB':>12} {'cached run s':>13}")
    for (trainer, size, run), result in results.items():
        if run == "first":
            cached = results[(trainer, size, "cached")]["seconds"]
            print(f"{size:>9} {trainer:<8} {result['rows'] / result['seconds']:>9.0f} {result['peak_rss_mb']:>12.0f} "
                  f"{cached:>13.1f}")
    for size in args.sizes:
        ours, theirs = results[("molting", size, "first")], results[("trl", size, "first")]
        speed = (ours["rows"] / ours["seconds"]) / (theirs["rows"] / theirs["seconds"])
        print(f"molting/trl rows per second ({size} pairs): {speed:.3f}")
        print(f"molting/trl peak memory ({size} pairs): {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
