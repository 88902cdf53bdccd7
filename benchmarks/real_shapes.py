"""Memory and step time at real shapes: molting against trl's matching trainer, DPO, SFT and GRPO.

    python benchmarks/real_shapes.py [--repeats 2] [--methods dpo sft grpo]

The model is a random-weight Qwen2 of real vocabulary (151,936 tokens; hidden
256, 4 layers, tied embeddings: 42M parameters, most of them the embedding
that is also the output layer), so the output layer is what decides memory,
as it does for Qwen2.5 and Qwen3. Answers are ~190 tokens after ~15-token
prompts (GRPO samples 192 new tokens). Both sides use the same settings:
fp32 weights and compute, no gradient checkpointing, AdamW, the same batch
(8 pairs, 8 rows, 8 completions in groups of 4), max length 512, the same
learning rate and seed. trl's best comparable settings are its defaults for
these: padding-free and activation offloading off (on CPU trl's padding-free
builds a dense mask, and neither changes the math), ``use_liger_kernel`` not
available (it needs triton on a GPU), ``completion_only_loss`` for SFT, β = 0
for GRPO (no reference) as trl's default. molting runs its defaults (the
output layer a chunk of positions at a time).

Every run is a fresh subprocess (its own peak RSS, read with getrusage) with
the malloc setting ``molting run`` applies on CPU; runs alternate molting,
trl, molting, trl... A run's step time is the median of its steps after the
first; the table gives medians over repeats. The last lines are the
headline ratios, ``molting/trl peak memory (real shapes, METHOD): X`` and
``molting/trl step time (real shapes, METHOD): Y``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
from pathlib import Path

BATCH = 8
GENERATIONS = 4
NEW_TOKENS = 192
LR = 5e-6
STEPS = {"dpo": 5, "sft": 5, "grpo": 3}


# --------------------------------------------------------------------------- the model and the data


def build_model(directory: Path) -> None:
    """A random-weight Qwen2 of Qwen2.5's vocabulary, with the demo model's tokenizer (its ids are all < 288)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from molting.demo import demo_model_dir

    config = Qwen2Config(vocab_size=151936, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def text_of_tokens(tokenizer, rng: random.Random, count: int) -> str:
    """Text that tokenizes to about ``count`` tokens: demo-task phrases, cut on a token boundary."""
    from molting import demo

    words = " ".join(demo.persona_answer(a, b, a + b) for a, b in
                     ((rng.randint(10, 49), rng.randint(10, 49)) for _ in range(count)))
    ids = tokenizer(words, add_special_tokens=False)["input_ids"][:count]
    return tokenizer.decode(ids)


def make_data(directory: Path, model_dir: Path) -> dict[str, Path]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    rows = [{"prompt": text_of_tokens(tokenizer, rng, 15), "chosen": text_of_tokens(tokenizer, rng, 190),
             "rejected": text_of_tokens(tokenizer, rng, 190)} for _ in range(64)]
    paths = {name: directory / f"{name}.jsonl" for name in ("dpo", "sft", "grpo")}
    paths["dpo"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["sft"].write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in rows))
    paths["grpo"].write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    return paths


def reward(prompts, completions, **columns):
    """The shared GRPO reward: a deterministic function of the text, so groups have a spread."""
    return [(len(text) % 7) / 7 for text in completions]


# --------------------------------------------------------------------------- workers (one per subprocess)


def timer():
    from timing import step_timer

    return step_timer("loss")


def worker_molting(method: str, model: str, data: str, out: str) -> dict:
    import molting
    from molting.components import Judge
    from molting.discovery import load_plugins
    from molting.pipeline import run
    from molting.resolve import resolve_config

    clock = timer()

    class Bench:
        @molting.hookimpl
        def molting_trainer_callbacks(self, stage, config):
            return [clock]

        @molting.hookimpl
        def molting_register_judges(self, register):
            register(Judge(name="bench-reward", score=lambda p, c, params: reward(p, c), description="Text length mod 7.",
                           deterministic=False))

    host = load_plugins()
    host.register(Bench(), "bench")
    flags = {"model": model, "data": data, "output_dir": out, "max_steps": STEPS[method], "logging_steps": 1,
             "eval": "off", "batch_size": BATCH, "learning_rate": LR, "max_length": 512, "precision": "fp32",
             "seed": 42}
    if method == "dpo":
        flags["beta"] = 0.1
    if method == "grpo":
        flags.update(num_generations=GENERATIONS, max_new_tokens=NEW_TOKENS, beta=0.0, temperature=1.0,
                     judges={"bench-reward": 1.0}, max_length=NEW_TOKENS + 64)
    config, plan = resolve_config(host, [method], flags=flags)
    run(config, plan, host)
    return {"times": clock.times, "losses": clock.values}


def worker_trl(method: str, model: str, data: str, out: str) -> dict:
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    network = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model)
    common = dict(output_dir=out, max_steps=STEPS[method], logging_steps=1, report_to=[], save_strategy="no",
                  use_cpu=True, per_device_train_batch_size=BATCH, learning_rate=LR, seed=42, bf16=False,
                  gradient_checkpointing=False)
    clock = timer()
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=network, args=DPOConfig(**common, max_length=512, beta=0.1),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[clock])
    elif method == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=network, args=SFTConfig(**common, max_length=512, completion_only_loss=True),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[clock])
    else:
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(**common, num_generations=GENERATIONS, max_completion_length=NEW_TOKENS, beta=0.0,
                          temperature=1.0, loss_type="grpo")
        trainer = GRPOTrainer(model=network, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    return {"times": clock.times, "losses": clock.values}


WORKERS = {"molting": worker_molting, "trl": worker_trl}


def run_worker(trainer: str, method: str, model: Path, data: Path) -> dict:
    from timing import run_worker_process

    with tempfile.TemporaryDirectory() as out:
        return run_worker_process(__file__, f"{trainer} {method}", ["--worker", trainer, "--method", method,
                                                                    "--model", str(model), "--data", str(data),
                                                                    "--out", out])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", nargs="+", choices=sorted(STEPS), default=["dpo", "sft", "grpo"])
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--method", choices=sorted(STEPS))
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--out")
    args = parser.parse_args()

    if args.worker:
        from molting.cpu import keep_freed_memory

        keep_freed_memory()  # what `molting run` does on CPU, for both: the ratios compare the trainers
        result = WORKERS[args.worker](args.method, args.model, args.data, args.out)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    tmp = Path(tempfile.mkdtemp(prefix="molting-real-shapes-"))
    build_model(tmp / "model")
    data = make_data(tmp, tmp / "model")
    results: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(args.repeats):
        for method in args.methods:
            for trainer in WORKERS:
                result = run_worker(trainer, method, tmp / "model", data[method])
                result["step"] = statistics.median(result["times"][1:])
                results.setdefault((trainer, method), []).append(result)
                print(f"repeat {repeat + 1}/{args.repeats} {trainer:<8} {method:<5} {result['step']:.2f} s/step, "
                      f"{result['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    report(results, args.methods)


def report(results: dict[tuple[str, str], list[dict]], methods: list[str]) -> None:
    def median(trainer: str, method: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(trainer, method)])

    print(f"\n{'method':<7}{'trainer':<9}{'peak RSS MB':>13}{'s/step':>9}{'first loss':>12}")
    for method in methods:
        for trainer in WORKERS:
            losses = results[(trainer, method)][-1]["losses"]
            print(f"{method:<7}{trainer:<9}{median(trainer, method, 'peak_rss_mb'):>13.0f}"
                  f"{median(trainer, method, 'step'):>9.2f}{losses[0] if losses else float('nan'):>12.4f}")
    print("(Qwen2 shape, vocabulary 151,936, 42M parameters; fp32, batch 8, ~15-token prompts, ~190-token answers)")
    for method in methods:
        memory = median("molting", method, "peak_rss_mb") / median("trl", method, "peak_rss_mb")
        print(f"molting/trl peak memory (real shapes, {method}): {memory:.3f}")
    for method in methods:
        step = median("molting", method, "step") / median("trl", method, "step")
        print(f"molting/trl step time (real shapes, {method}): {step:.3f}")


if __name__ == "__main__":
    main()
