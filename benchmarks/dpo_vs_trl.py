"""DPO step time and memory: molting vs trl's DPOTrainer vs a plain PyTorch loop, side by side in one run.

    python benchmarks/dpo_vs_trl.py [--repeats 3] [--steps 12]

Every configuration trains the built-in demo model (3.5M-parameter Llama) in
a fresh subprocess, so peak RSS is its own; configurations alternate
(A B C A B C ...) so drift of a noisy machine hits all of them alike. Step
times are the median of each run's steps after two warm-up steps; the table
shows the median over repeats with the min-max range. The last two lines are
the headline ratios:

    molting/trl step-time ratio (same settings): X
        fixed-length data, live reference, padded batches, fp32, no gradient checkpointing
    molting/trl step-time ratio (mixed lengths, best settings): Y
        lengths spread over 16-256 tokens; molting with --precompute-ref and
        length-grouped batches, trl with precompute_ref_log_probs and padding_free
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


def worker_molting_bf16(data: str, steps: int, out: str, best: bool, defaults: bool) -> dict:
    return worker_molting(data, steps, out, best, defaults, precision="bf16")


def worker_molting(data: str, steps: int, out: str, best: bool, defaults: bool, precision: str = "auto") -> dict:
    import molting
    from molting.discovery import load_plugins
    from molting.run import resolve_config, run

    timer = step_timer()

    class Timing:
        @molting.hookimpl
        def molting_trainer_callbacks(self, stage, config):
            return [timer]

    host = load_plugins()
    host.register(Timing(), "timing")
    flags = {"data": data, "max_steps": steps, "eval": "off", "output_dir": out, "logging_steps": 1, "precision": precision}
    if not defaults:
        flags.update(batch_size=BATCH, learning_rate=LR, max_length=512, beta=0.1)
    if best:
        flags.update(precompute_ref=True, group_by_length=True)
    config, plan = resolve_config(host, ["dpo"], flags=flags)
    run(config, plan, host)
    return {"times": timer.times, "losses": timer.values}


def worker_trl(data: str, steps: int, out: str, best: bool, defaults: bool) -> dict:
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
    if best:
        kwargs.update(precompute_ref_log_probs=True, padding_free=True)
    timer = step_timer()
    trainer = DPOTrainer(model=model, args=DPOConfig(**kwargs), train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return {"times": timer.times, "losses": timer.values}


def worker_plain(data: str, steps: int, out: str, best: bool, defaults: bool) -> dict:
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


WORKERS = {"molting": worker_molting, "molting-bf16": worker_molting_bf16, "trl": worker_trl, "plain": worker_plain}

# name: (worker, data, best, defaults)
CONFIGS = {
    "plain loop": ("plain", "fixed", False, False),
    "molting": ("molting", "fixed", False, False),
    "trl": ("trl", "fixed", False, False),
    "molting defaults": ("molting", "fixed", False, True),
    "trl defaults": ("trl", "fixed", False, True),
    "molting --precision bf16": ("molting-bf16", "fixed", False, False),
    "molting best (mixed)": ("molting", "mixed", True, False),
    "trl best (mixed)": ("trl", "mixed", True, False),
}


def run_worker(name: str, data: Path, steps: int) -> dict:
    worker, _, best, defaults = CONFIGS[name]
    from timing import run_worker_process

    with tempfile.TemporaryDirectory() as out:
        args = ["--worker", worker, "--data", str(data), "--steps", str(steps), "--out", out]
        args += ["--best"] if best else []
        args += ["--defaults"] if defaults else []
        return run_worker_process(__file__, name, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--data")
    parser.add_argument("--out")
    parser.add_argument("--best", action="store_true")
    parser.add_argument("--defaults", action="store_true")
    args = parser.parse_args()

    if args.worker:
        result = WORKERS[args.worker](args.data, args.steps, args.out, args.best, args.defaults)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    tmp = Path(tempfile.mkdtemp(prefix="molting-bench-"))
    data = {"fixed": tmp / "fixed.jsonl", "mixed": tmp / "mixed.jsonl"}
    make_data(data["fixed"], mixed=False)
    make_data(data["mixed"], mixed=True)
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for repeat in range(args.repeats):
        for name, (_, kind, _, _) in CONFIGS.items():
            result = run_worker(name, data[kind], args.steps)
            result["step"] = statistics.median(result["times"][2:])
            results[name].append(result)
            print(f"repeat {repeat + 1}/{args.repeats} {name:<22} {result['step']:.3f} s/step", file=sys.stderr, flush=True)

    def step(name: str) -> float:
        return statistics.median(r["step"] for r in results[name])

    print(f"\n{'configuration':<24}{'s/step (median)':>16}{'min-max':>16}{'peak RSS MB':>13}{'final loss':>12}")
    for name, runs in results.items():
        steps = [r["step"] for r in runs]
        print(f"{name:<24}{step(name):>16.3f}{f'{min(steps):.3f}-{max(steps):.3f}':>16}"
              f"{statistics.median(r['peak_rss_mb'] for r in runs):>13.0f}{runs[-1]['losses'][-1]:>12.4f}")
    same = [abs(a - b) for a, b in zip(results["molting"][-1]["losses"], results["trl"][-1]["losses"])]
    print(f"\nmax |molting - trl| loss over the {len(same)} steps, same settings: {max(same):.2e}")
    print(f"molting / plain loop: {step('molting') / step('plain loop'):.3f}")
    print(f"molting defaults / trl defaults: {step('molting defaults') / step('trl defaults'):.3f}")
    print(f"molting --precision bf16 / trl defaults: {step('molting --precision bf16') / step('trl defaults'):.3f}")
    print(f"molting/trl step-time ratio (same settings): {step('molting') / step('trl'):.3f}")
    print(f"molting/trl step-time ratio (mixed lengths, best settings): {step('molting best (mixed)') / step('trl best (mixed)'):.3f}")


if __name__ == "__main__":
    main()
