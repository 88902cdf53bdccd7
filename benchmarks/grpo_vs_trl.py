"""GRPO step time: molting's grpo stage vs trl's GRPOTrainer, same model, prompts, G, lengths and reward.

    python benchmarks/grpo_vs_trl.py [--repeats 3] [--steps 12] [--generations 8] [--batch-size 16]

Both train the built-in demo model (3.5M-parameter Llama) in fp32 on the
demo-prompts rows: ``--batch-size`` completions a step (``--generations``
per prompt), at most 20 new tokens at temperature 1, β = 0 (no reference),
the ``grpo`` loss, one generation batch per step, the same reward function
(1 for the right sum, else 0: the demo's grading). Each run is a fresh
subprocess; the two alternate (molting trl molting trl ...) so drift of a
noisy machine hits both alike. A run's step time is the median of its steps
after two warm-up steps (a step samples, scores and trains); the table shows
the median over repeats with the min-max range. The last line is the
headline:

    molting/trl GRPO step-time ratio: X
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile

LR = 1e-4
MAX_NEW_TOKENS = 20


def correct(prompts, completions, **columns):
    """The shared reward: 1.0 when the completion states the right sum (the demo's grading), else 0.0."""
    from molting import demo

    return [float(demo.grade(p, c)["correct"]) for p, c in zip(prompts, completions)]


def step_timer():
    from timing import step_timer as timer

    return timer("reward")


def worker_molting(steps: int, out: str, generations: int, batch_size: int) -> dict:
    import molting
    from molting.components import Judge
    from molting.discovery import load_plugins
    from molting.pipeline import run
    from molting.resolve import resolve_config

    timer = step_timer()

    class Bench:
        @molting.hookimpl
        def molting_trainer_callbacks(self, stage, config):
            return [timer]

        @molting.hookimpl
        def molting_register_judges(self, register):
            register(Judge(name="bench-correct", score=lambda p, c, params: correct(p, c),
                           description="1 for the right sum, else 0.", deterministic=False))  # no cache: as trl

    host = load_plugins()
    host.register(Bench(), "bench")
    flags = {"max_steps": steps, "eval": "off", "output_dir": out, "logging_steps": 1, "precision": "fp32",
             "batch_size": batch_size, "learning_rate": LR, "lr_scheduler_type": "constant", "seed": 42,
             "num_generations": generations, "max_new_tokens": MAX_NEW_TOKENS, "beta": 0.0, "temperature": 1.0,
             "judges": {"bench-correct": 1.0}}
    config, plan = resolve_config(host, ["grpo"], recipe={"model": str(molting.demo.demo_model_dir())}, flags=flags)
    run(config, plan, host)
    return {"times": timer.times, "rewards": timer.values}


def worker_trl(steps: int, out: str, generations: int, batch_size: int) -> dict:
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from molting.demo import demo_model_dir, prompt_rows

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    args = GRPOConfig(
        output_dir=out, max_steps=steps, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=not torch.cuda.is_available(), bf16=False, per_device_train_batch_size=batch_size,
        num_generations=generations, max_completion_length=MAX_NEW_TOKENS, beta=0.0, loss_type="grpo",
        temperature=1.0, learning_rate=LR, lr_scheduler_type="constant", seed=42, gradient_checkpointing=False,
    )
    timer = step_timer()
    trainer = GRPOTrainer(model=model, reward_funcs=correct, args=args, train_dataset=Dataset.from_list(prompt_rows("train")),
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return {"times": timer.times, "rewards": timer.values}


WORKERS = {"molting": worker_molting, "trl": worker_trl}


def run_worker(name: str, steps: int, generations: int, batch_size: int) -> dict:
    from timing import run_worker_process

    with tempfile.TemporaryDirectory() as out:
        return run_worker_process(__file__, name, ["--worker", name, "--steps", str(steps), "--out", out,
                                                   "--generations", str(generations), "--batch-size", str(batch_size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--out")
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.steps, args.out, args.generations, args.batch_size)))
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {device}; {args.batch_size} completions a step, {args.generations} per prompt, "
          f"<= {MAX_NEW_TOKENS} new tokens, fp32, beta 0, loss grpo", file=sys.stderr)
    results: dict[str, list[dict]] = {name: [] for name in WORKERS}
    for repeat in range(args.repeats):
        for name in WORKERS:
            result = run_worker(name, args.steps, args.generations, args.batch_size)
            result["step"] = statistics.median(result["times"][2:])
            results[name].append(result)
            print(f"repeat {repeat + 1}/{args.repeats} {name:<8} {result['step']:.3f} s/step", file=sys.stderr, flush=True)

    def step(name: str) -> float:
        return statistics.median(r["step"] for r in results[name])

    print(f"\n{'trainer':<10}{'s/step (median)':>16}{'min-max':>16}{'mean reward':>13}")
    for name, runs in results.items():
        steps = [r["step"] for r in runs]
        rewards = [x for r in runs for x in r["rewards"]]
        print(f"{name:<10}{step(name):>16.3f}{f'{min(steps):.3f}-{max(steps):.3f}':>16}"
              f"{sum(rewards) / max(len(rewards), 1):>13.3f}")
    print(f"molting/trl GRPO step-time ratio: {step('molting') / step('trl'):.3f}")


if __name__ == "__main__":
    main()
