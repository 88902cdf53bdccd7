"""Loading and tokenizing preference pairs at scale: molting's preference stage against trl's DPOTrainer.

    python benchmarks/data_scale.py [--sizes 10000 100000 1000000]

For each size a JSONL file of pairs (~30-token prompts, ~100-token answers,
the demo task's words) is written once; then, each in a fresh process with
an empty datasets cache (no run reuses another's work), molting reads,
checks, formats and tokenizes it as its preference stage does before
training (``read_rows``, ``format_pairs``, ``tokenize_pairs``), and trl's
DPOTrainer is built on it (``load_dataset("json")`` and the trainer's own
preparation: prompt handling, EOS, tokenizing with ``Dataset.map``). Both
use the demo model's tokenizer. Each prints rows per second and the
process's peak RSS; the last lines are the ratios at each size.
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

    from molting.data import read_rows
    from molting.demo import demo_model_dir
    from molting.pairs import format_pairs, tokenize_pairs

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    return len(tokenize_pairs(format_pairs(read_rows(path), tokenizer, path), tokenizer, 1024, "truncate", path))


def worker_trl(path: str) -> int:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from molting.demo import demo_model_dir

    dataset = datasets.load_dataset("json", data_files=path, split="train")
    with tempfile.TemporaryDirectory() as out:
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(demo_model_dir()), train_dataset=dataset,
                             args=DPOConfig(output_dir=out, use_cpu=True, report_to=[], max_length=1024),
                             processing_class=AutoTokenizer.from_pretrained(demo_model_dir()))
        return len(trainer.train_dataset)


WORKERS = {"molting": worker_molting, "trl": worker_trl}


def run_worker(trainer: str, path: Path) -> dict:
    import subprocess

    with tempfile.TemporaryDirectory() as cache:
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
                result = run_worker(trainer, path)
                results[(trainer, size)] = result
                print(f"{trainer:<8} {size:>9} rows: {result['rows'] / result['seconds']:>8.0f} rows/s, "
                      f"{result['peak_rss_mb']:>7.0f} MB", file=sys.stderr, flush=True)
    print(f"\n{'rows':>9} {'trainer':<8} {'rows/s':>9} {'peak RSS MB':>12}")
    for (trainer, size), result in results.items():
        print(f"{size:>9} {trainer:<8} {result['rows'] / result['seconds']:>9.0f} {result['peak_rss_mb']:>12.0f}")
    for size in args.sizes:
        speed = ((results[("molting", size)]["rows"] / results[("molting", size)]["seconds"])
                 / (results[("trl", size)]["rows"] / results[("trl", size)]["seconds"]))
        memory = results[("molting", size)]["peak_rss_mb"] / results[("trl", size)]["peak_rss_mb"]
        print(f"molting/trl rows per second ({size} pairs): {speed:.3f}")
        print(f"molting/trl peak memory ({size} pairs): {memory:.3f}")


if __name__ == "__main__":
    main()
