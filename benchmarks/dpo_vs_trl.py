"""DPO step time and memory: molting vs trl's DPOTrainer vs a plain PyTorch loop, side by side in one run.

    python benchmarks/dpo_vs_trl.py [--repeats 3] [--steps 12]

Every configuration trains the built-in demo model (3.5M-parameter Llama) in
a fresh subprocess, so peak RSS is its own. Each worker first applies the
malloc setting `molting run` applies on CPU (``molting.cpu.keep_freed_memory``),
so the ratios compare training loops, not allocators; ``--default-malloc``
leaves glibc's defaults in every worker; configurations alternate
(A B C A B C ...) so drift of a noisy machine hits all of them alike. Step
times are the median of each run's steps after two warm-up steps; the table
shows the median over repeats with the min-max range. The last two lines are
the headline ratios:

    molting/trl step-time ratio (same settings): X
        fixed-length data, live reference, padded batches, fp32, no gradient checkpointing
    molting/trl step-time ratio (mixed lengths, best settings): Y
        lengths spread over 16-256 tokens; the fastest of molting's mixed-length
        variants (--precompute-ref, plus --group-by-length or --padding-free)
        against the fastest of trl's (precompute_ref_log_probs, with or without
        padding_free)

    python benchmarks/dpo_vs_trl.py --only "molting precompute (mixed)" "molting padding-free (mixed)"

runs a subset (here: the padding-free tokens/s gain).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

BATCH = 8
LR = 5e-5


# --------------------------------------------------------------------------- data


def make_data(path: Path, mixed: bool, n: int = 256) -> None:
    """Preference pairs of the demo task, padded with extra questions to a fixed or a spread length."""
    from molting import demo

    rng = random.Random(0)
    rows = []
    for row in demo.preference_rows("train", n):
        # each extra question is ~14 tokens; fixed: ~114 tokens in all, mixed: 16-256
        extra = 7 if not mixed else rng.randint(0, 16)
        filler = "".join(demo.prompt_for(rng.randint(10, 49), rng.randint(10, 49)).replace("A:", "") for _ in range(extra))
        rows.append({"prompt": filler + row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------- workers (one per subprocess)


def step_timer():
    from timing import step_timer as timer

    return timer("loss")


# The settings each variant adds to the same-settings run (batch 8, max length 512, lr 5e-5, beta 0.1, fp32)
MOLTING_VARIANTS = {
    "same": {},
    "bf16": {"precision": "bf16"},
    "precompute": {"precompute_ref": True},
    "grouped": {"precompute_ref": True, "group_by_length": True},
    "padding-free": {"precompute_ref": True, "padding_free": True},
}
# trl 1.16's DPOTrainer cannot group by length: its tokenized rows have no input_ids column for the Trainer's
# length-grouped sampler, and a length column added to the data does not reach it
TRL_VARIANTS = {
    "same": {},
    "precompute": {"precompute_ref_log_probs": True},
    "padding-free": {"precompute_ref_log_probs": True, "padding_free": True},
}


def worker_molting(data: str, steps: int, out: str, variant: str, defaults: bool) -> dict:
    import molting
    from molting.discovery import load_plugins
    from molting.pipeline import run
    from molting.resolve import resolve_config

    timer = step_timer()

    class Timing:
        @molting.hookimpl
        def molting_trainer_callbacks(self, stage, config):
            return [timer]

    host = load_plugins()
    host.register(Timing(), "timing")
    flags = {"data": data, "max_steps": steps, "eval": "off", "output_dir": out, "logging_steps": 1}
    if not defaults:
        flags.update(batch_size=BATCH, learning_rate=LR, max_length=512, beta=0.1, precision="fp32")
        flags.update(MOLTING_VARIANTS[variant])
    config, plan = resolve_config(host, ["dpo"], flags=flags)
    run(config, plan, host)
    return {"times": timer.times, "losses": timer.values}


def worker_trl(data: str, steps: int, out: str, variant: str, defaults: bool) -> dict:
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from molting.demo import demo_model_dir

    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    kwargs = dict(output_dir=out, max_steps=steps, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                  per_device_train_batch_size=BATCH, learning_rate=LR, max_length=512, beta=0.1, seed=42)
    if not defaults:
        kwargs.update(bf16=False, gradient_checkpointing=False)
        kwargs.update(TRL_VARIANTS[variant])
    timer = step_timer()
    trainer = DPOTrainer(model=model, args=DPOConfig(**kwargs), train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return {"times": timer.times, "losses": timer.values}


def worker_plain(data: str, steps: int, out: str, variant: str, defaults: bool) -> dict:
    """The floor: the DPO loss in a hand-written loop, nothing else."""
    import copy

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from molting.demo import demo_model_dir

    torch.manual_seed(42)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    eos = tokenizer.eos_token_id
    order = list(range(len(rows)))
    random.Random(42).shuffle(order)

    def batch_of(indices):
        seqs, masks = [], []
        for key in ("chosen", "rejected"):
            for i in indices:
                p = tokenizer(rows[i]["prompt"], add_special_tokens=False)["input_ids"]
                c = tokenizer(rows[i][key], add_special_tokens=False)["input_ids"] + [eos]
                seqs.append(p + c)
                masks.append([0] * len(p) + [1] * len(c))
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
        attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        comp = torch.tensor([m + [0] * (width - len(m)) for m in masks])
        return ids, attn, comp

    def logps(m, ids, attn, comp):
        logits = m(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        token = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(-1)
        return (token * comp[:, 1:]).sum(-1)

    times, losses = [], []
    for step in range(steps):
        start = time.perf_counter()
        ids, attn, comp = batch_of(order[step * BATCH : (step + 1) * BATCH])
        policy = logps(model, ids, attn, comp)
        with torch.no_grad():
            reference = logps(ref, ids, attn, comp)
        h = (policy[:BATCH] - reference[:BATCH]) - (policy[BATCH:] - reference[BATCH:])
        loss = -F.logsigmoid(0.1 * h).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"times": times, "losses": losses}


WORKERS = {"molting": worker_molting, "trl": worker_trl, "plain": worker_plain}

# name: (worker, data, variant, defaults)
CONFIGS = {
    "plain loop": ("plain", "fixed", "same", False),
    "molting": ("molting", "fixed", "same", False),
    "trl": ("trl", "fixed", "same", False),
    "molting defaults": ("molting", "fixed", "same", True),
    "trl defaults": ("trl", "fixed", "same", True),
    "molting --precision bf16": ("molting", "fixed", "bf16", False),
    "molting precompute (mixed)": ("molting", "mixed", "precompute", False),
    "molting grouped (mixed)": ("molting", "mixed", "grouped", False),
    "molting padding-free (mixed)": ("molting", "mixed", "padding-free", False),
    "trl precompute (mixed)": ("trl", "mixed", "precompute", False),
    "trl padding-free (mixed)": ("trl", "mixed", "padding-free", False),
}
MOLTING_MIXED = [name for name in CONFIGS if name.startswith("molting") and "(mixed)" in name]
TRL_MIXED = [name for name in CONFIGS if name.startswith("trl") and "(mixed)" in name]


def run_worker(name: str, data: Path, steps: int, default_malloc: bool = False) -> dict:
    worker, _, variant, defaults = CONFIGS[name]
    from timing import run_worker_process

    with tempfile.TemporaryDirectory() as out:
        args = ["--worker", worker, "--data", str(data), "--steps", str(steps), "--out", out]
        args += ["--variant", variant] + (["--default-malloc"] if default_malloc else [])
        args += ["--defaults"] if defaults else []
        return run_worker_process(__file__, name, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--data")
    parser.add_argument("--out")
    parser.add_argument("--variant", default="same")
    parser.add_argument("--defaults", action="store_true")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc malloc as it is in every worker (molting.cpu.keep_freed_memory not applied)")
    parser.add_argument("--only", nargs="+", metavar="CONFIG", choices=sorted(CONFIGS),
                        help="run these configurations only (the ratios that need others are not printed)")
    args = parser.parse_args()

    if args.worker:
        if not args.default_malloc:
            from molting.cpu import keep_freed_memory

            keep_freed_memory()  # what `molting run` does on CPU; every worker gets it, so ratios compare the loops
        result = WORKERS[args.worker](args.data, args.steps, args.out, args.variant, args.defaults)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    tmp = Path(tempfile.mkdtemp(prefix="molting-bench-"))
    data = {"fixed": tmp / "fixed.jsonl", "mixed": tmp / "mixed.jsonl"}
    make_data(data["fixed"], mixed=False)
    make_data(data["mixed"], mixed=True)
    chosen = {name: CONFIGS[name] for name in args.only or CONFIGS}
    results: dict[str, list[dict]] = {name: [] for name in chosen}
    for repeat in range(args.repeats):
        for name, (_, kind, _, _) in chosen.items():
            result = run_worker(name, data[kind], args.steps, args.default_malloc)
            result["step"] = statistics.median(result["times"][2:])
            results[name].append(result)
            print(f"repeat {repeat + 1}/{args.repeats} {name:<22} {result['step']:.3f} s/step", file=sys.stderr, flush=True)

    def step(name: str) -> float:
        return statistics.median(r["step"] for r in results[name])

    from transformers import AutoTokenizer

    from molting.demo import demo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    tokens = {kind: BATCH * mean_pair_tokens(path, tokenizer) for kind, path in data.items()}
    print(f"\n{'configuration':<30}{'s/step (median)':>16}{'min-max':>14}{'tokens/s':>10}{'peak RSS MB':>13}{'final loss':>12}")
    for name, runs in results.items():
        steps = [r["step"] for r in runs]
        print(f"{name:<30}{step(name):>16.3f}{f'{min(steps):.3f}-{max(steps):.3f}':>14}"
              f"{tokens[CONFIGS[name][1]] / step(name):>10.0f}"
              f"{statistics.median(r['peak_rss_mb'] for r in runs):>13.0f}{runs[-1]['losses'][-1]:>12.4f}")
    print(f"(tokens/s: the data's mean real tokens per batch of {BATCH} pairs over the step time; padding not counted)")

    def ratio(label: str, a: str, b: str) -> None:
        if a in results and b in results:
            print(f"{label}: {step(a) / step(b):.3f}")

    if "molting" in results and "trl" in results:
        same = [abs(a - b) for a, b in zip(results["molting"][-1]["losses"], results["trl"][-1]["losses"])]
        print(f"\nmax |molting - trl| loss over the {len(same)} steps, same settings: {max(same):.2e}")
    ratio("molting / plain loop", "molting", "plain loop")
    ratio("molting defaults / trl defaults", "molting defaults", "trl defaults")
    ratio("molting --precision bf16 / trl defaults", "molting --precision bf16", "trl defaults")
    ratio("padding-free / padded tokens/s, mixed lengths", "molting precompute (mixed)", "molting padding-free (mixed)")
    best_molting = min((n for n in MOLTING_MIXED if n in results), key=step, default=None)
    best_trl = min((n for n in TRL_MIXED if n in results), key=step, default=None)
    if best_molting and best_trl:
        print(f"(mixed lengths, best settings: {best_molting} against {best_trl})")
    # the two headline lines come last
    ratio("molting/trl step-time ratio (same settings)", "molting", "trl")
    if best_molting and best_trl:
        ratio("molting/trl step-time ratio (mixed lengths, best settings)", best_molting, best_trl)


def mean_pair_tokens(path: Path, tokenizer) -> float:
    """Mean tokens of a pair's two sequences (prompt + completion + EOS each), as both trainers tokenize them."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return statistics.mean(2 * count(r["prompt"]) + count(r["chosen"]) + count(r["rejected"]) + 2 for r in rows)


if __name__ == "__main__":
    main()
