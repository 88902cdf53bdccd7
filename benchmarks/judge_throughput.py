"""Judge throughput over HTTP: the ``openai`` judge against ``molting serve``, with and without the cache.

Starts ``molting serve`` on the demo model in a subprocess (as a user
would), then scores ``--judgements`` distinct answers with the ``openai``
judge at each ``--concurrency``, several times. It reports the median
judgements per second with the cache off (every answer a request) and
with it on (the same answers again, as when an online stage samples a
completion twice), and how many ``generate`` calls the server made (its
batching). Then it does the same against a deliberately unreliable server
(tests/judge_server.py): every request fails its first attempt with a 500,
or a slow answer times out. It prints the retries, the failures and the
cost in time.

    python benchmarks/judge_throughput.py --judgements 128 --concurrency 1 8 16 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the scripted server lives with the tests

# the demo model cannot grade: the "rubric" is a demo question after the answer, and the score the number it says
DEMO_JUDGE = {"template": "{question}{answer}\nQ: What is 1 + 1?\nA:", "score_pattern": r"(\d+)", "min_score": 0,
              "max_score": 1e9, "max_tokens": 12}


def scorer_for(url: str, cache: bool, **settings):
    from molting.discovery import load_plugins
    from molting.judging import JudgeSpec, Scorer

    judge = load_plugins().get("judge", "openai")
    params = judge.params(base_url=url, model="demo", cache=cache, **settings)
    return Scorer([JudgeSpec("openai", judge, 1.0, params)], on_error="zero"), params


def workload(count: int) -> tuple[list[str], list[str]]:
    prompts = [f"Q: What is {i % 50} + {i // 50 + 3}?\nA:" for i in range(count)]
    answers = [f" Arr! {i % 50} plus {i // 50 + 3} be {i % 50 + i // 50 + 3 + i % 3}, matey." for i in range(count)]
    return prompts, answers


def batches(url: str) -> int:
    return httpx.get(url.replace("/v1", "/health")).json()["batches"]


def throughput(url: str, count: int, concurrency: int, repeats: int) -> dict[str, float]:
    prompts, answers = workload(count)
    cold, warm, calls = [], [], []
    for _ in range(repeats):
        scorer, _ = scorer_for(url, cache=True, concurrency=concurrency, **DEMO_JUDGE)
        before = batches(url)
        started = time.perf_counter()
        scorer(prompts, answers)
        cold.append(count / (time.perf_counter() - started))
        calls.append(batches(url) - before)
        started = time.perf_counter()
        scorer(prompts, answers)  # every answer again: from the cache
        warm.append(count / (time.perf_counter() - started))
    return {"uncached": statistics.median(cold), "cached": statistics.median(warm),
            "generate_calls": statistics.median(calls)}


def faults(count: int) -> None:
    from judge_server import ScriptedServer

    prompts, answers = workload(count)
    cases = [("every request's first attempt a 500", dict(fault="500", fail_first=1), {}),
             ("every attempt a 503 (gives up)", dict(fault="503", fail_first=-1), {"max_retries": 2}),
             ("slow answers (2 s) against a 0.2 s timeout", dict(fault="slow", fail_first=-1),
              {"timeout": 0.2, "max_retries": 1}),
             ("dropped connections on the first attempt", dict(fault="drop", fail_first=1), {})]
    print(f"\nagainst an unreliable server ({count} judgements, backoff 0.05 s, concurrency 8):")
    print(f"{'case':<46} {'requests':>8} {'retries':>8} {'failed':>7} {'seconds':>8}")
    for label, fault, settings in cases:
        with ScriptedServer() as server:
            for key, value in fault.items():
                setattr(server, key, value)
            scorer, params = scorer_for(server.url, cache=False, backoff=0.05, **settings)
            started = time.perf_counter()
            scorer(prompts, answers)
            elapsed = time.perf_counter() - started
            stats = scorer.specs[0].judge.stats(params)
            print(f"{label:<46} {stats['requests']:>8} {stats['retries']:>8} {scorer.failed['openai']:>7} "
                  f"{elapsed:>8.2f}")


def main() -> None:
    from molting.demo import demo_model_dir
    from molting.serve import spawn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judgements", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    process, url = spawn(str(demo_model_dir()), "--model-name", "demo")
    try:
        print(f"openai judge against molting serve (demo model, {os.cpu_count()} cores), {args.judgements} distinct "
              f"answers, median of {args.repeats}:")
        print(f"{'concurrency':>11} {'judgements/s':>13} {'cached/s':>10} {'generate calls':>15}")
        for concurrency in args.concurrency:
            row = throughput(url, args.judgements, concurrency, args.repeats)
            print(f"{concurrency:>11} {row['uncached']:>13.1f} {row['cached']:>10.0f} {row['generate_calls']:>15.0f}")
    finally:
        process.terminate()
        process.wait(timeout=60)
    faults(min(args.judgements, 32))


if __name__ == "__main__":
    main()
