"""GRPO step time: molting's grpo stage vs trl's GRPOTrainer, same model, prompts, G, lengths and reward.

    python benchmarks/grpo_vs_trl.py [--repeats 3] [--steps 12] [--generations 8] [--batch-size 16]
    python benchmarks/grpo_vs_trl.py --long [--samplers hf hf-paged]     # G = 8, 128 new tokens

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

``--samplers`` runs molting once per sampler (``--sampler``: ``hf``,
``hf-paged``) and prints each one's ratio to trl. ``--long`` is the
long-generation case: G = 8, 128 new tokens, on a random-weight model of the
demo model's shape (a random model rarely says EOS, so every completion runs
the full 128 tokens; the trained demo model stops after ~15), 6 steps.
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


def random_model(directory: str) -> str:
    """The demo model's architecture and tokenizer with fresh random weights (seed 0): answers run long."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from molting.demo import demo_model_dir

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_model_dir()))
    model.to(torch.float32).save_pretrained(directory)
    AutoTokenizer.from_pretrained(demo_model_dir()).save_pretrained(directory)
    return directory


def worker_molting(steps: int, out: str, generations: int, batch_size: int, model: str, new_tokens: int,
                   sampler: str = "hf") -> dict:
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
             "num_generations": generations, "max_new_tokens": new_tokens, "beta": 0.0, "temperature": 1.0,
             "judges": {"bench-correct": 1.0}, "sampler": sampler}
    config, plan = resolve_config(host, ["grpo"], recipe={"model": model}, flags=flags)
    run(config, plan, host)
    return {"times": timer.times, "rewards": timer.values}


def worker_trl(steps: int, out: str, generations: int, batch_size: int, model: str, new_tokens: int,
               sampler: str = "") -> dict:
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from molting.demo import prompt_rows

    tokenizer = AutoTokenizer.from_pretrained(model)
    model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    args = GRPOConfig(
        output_dir=out, max_steps=steps, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=not torch.cuda.is_available(), bf16=False, per_device_train_batch_size=batch_size,
        num_generations=generations, max_completion_length=new_tokens, beta=0.0, loss_type="grpo",
        temperature=1.0, learning_rate=LR, lr_scheduler_type="constant", seed=42, gradient_checkpointing=False,
    )
    timer = step_timer()
    trainer = GRPOTrainer(model=model, reward_funcs=correct, args=args, train_dataset=Dataset.from_list(prompt_rows("train")),
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return {"times": timer.times, "rewards": timer.values}


WORKERS = {"molting": worker_molting, "trl": worker_trl}


def run_worker(name: str, steps: int, generations: int, batch_size: int, model: str, new_tokens: int,
               sampler: str) -> dict:
    from timing import run_worker_process

    with tempfile.TemporaryDirectory() as out:
        return run_worker_process(__file__, name, ["--worker", name, "--steps", str(steps), "--out", out,
                                                   "--generations", str(generations), "--batch-size", str(batch_size),
                                                   "--model", model, "--max-new-tokens", str(new_tokens),
                                                   "--sampler", sampler])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--samplers", nargs="+", default=["hf"])
    parser.add_argument("--long", action="store_true", help="G = 8, 128 new tokens on a random-weight model")
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--sampler", default="hf")
    parser.add_argument("--model")
    parser.add_argument("--out")
    args = parser.parse_args()
    new_tokens = args.max_new_tokens or (128 if args.long else MAX_NEW_TOKENS)
    steps = args.steps or (6 if args.long else 12)

    if args.worker:
        print(json.dumps(WORKERS[args.worker](steps, args.out, args.generations, args.batch_size, args.model,
                                              new_tokens, args.sampler)))
        return

    import torch

    from molting.demo import demo_model_dir

    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    with tempfile.TemporaryDirectory() as scratch:
        model = random_model(scratch + "/random") if args.long else str(demo_model_dir())
        print(f"device {device}; {args.batch_size} completions a step, {args.generations} per prompt, "
              f"<= {new_tokens} new tokens, fp32, beta 0, loss grpo, {'random-weight' if args.long else 'demo'} "
              f"model", file=sys.stderr)
        runs = [(f"molting {s}", "molting", s) for s in args.samplers] + [("trl", "trl", "")]
        results: dict[str, list[dict]] = {label: [] for label, _, _ in runs}
        for repeat in range(args.repeats):
            for label, worker, sampler in runs:
                result = run_worker(worker, steps, args.generations, args.batch_size, model, new_tokens, sampler)
                result["step"] = statistics.median(result["times"][2:])
                results[label].append(result)
                print(f"repeat {repeat + 1}/{args.repeats} {label:<18} {result['step']:.3f} s/step", file=sys.stderr,
                      flush=True)

    def step(label: str) -> float:
        return statistics.median(r["step"] for r in results[label])

    print(f"\n{'trainer':<20}{'s/step (median)':>16}{'min-max':>16}{'mean reward':>13}")
    for label, done in results.items():
        times = [r["step"] for r in done]
        rewards = [x for r in done for x in r["rewards"]]
        print(f"{label:<20}{step(label):>16.3f}{f'{min(times):.3f}-{max(times):.3f}':>16}"
              f"{sum(rewards) / max(len(rewards), 1):>13.3f}")
    for sampler in args.samplers:
        print(f"molting ({sampler})/trl GRPO step-time ratio: {step(f'molting {sampler}') / step('trl'):.3f}")


if __name__ == "__main__":
    main()
