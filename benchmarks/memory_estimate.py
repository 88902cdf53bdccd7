"""The dry-run memory estimate against the measured peak RSS, configuration by configuration.

    python benchmarks/memory_estimate.py [--only NAME ...]

Each configuration trains three steps of the real-shaped model of
``real_shapes.py`` (a random Qwen2 of vocabulary 151,936; ~15-token prompts,
~190-token answers) in a fresh process; the estimate is what ``molting
estimate`` prints for the same settings, before any weight loads. The table
gives both, their ratio, and the estimate's parts.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

CONFIGS = {
    "dpo full": ("dpo", {}),
    "dpo lora": ("dpo", {"lora_r": 16}),
    "dpo precomputed reference": ("dpo", {"precompute_ref": True}),
    "dpo batch 2": ("dpo", {"batch_size": 2}),
    "dpo gradient checkpointing": ("dpo", {"gradient_checkpointing": True}),
    "dpo full logits": ("dpo", {"logits_chunk_size": 0, "batch_size": 4}),
    "sft long answers": ("sft", {}),
    "sft bfloat16": ("sft", {"dtype": "bfloat16"}),
    "sft 8-bit adamw": ("sft", {"optim": "adamw_8bit"}),
    "sft bfloat16 8-bit adamw": ("sft", {"dtype": "bfloat16", "optim": "adamw_8bit"}),
}
BASE = {"max_steps": 3, "logging_steps": 1, "eval": "off", "batch_size": 8, "max_length": 512, "precision": "fp32",
        "seed": 42}


def flags_for(name: str, model: Path, data: Path, out: str | None = None) -> tuple[str, dict]:
    plugin, extra = CONFIGS[name]
    flags = {**BASE, **extra, "model": str(model), "data": str(data)}
    if out:
        flags["output_dir"] = out
    return plugin, flags


def worker(name: str, model: str, data: str, out: str) -> dict:
    from molting.cpu import keep_freed_memory
    from molting.discovery import load_plugins
    from molting.pipeline import run
    from molting.resolve import resolve_config

    keep_freed_memory()
    host = load_plugins()
    plugin, flags = flags_for(name, Path(model), Path(data), out)
    config, steps = resolve_config(host, [plugin], flags=flags)
    run(config, steps, host)
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def estimated(name: str, model: Path, data: Path):
    from molting.discovery import load_plugins
    from molting.estimate import estimate_run
    from molting.resolve import resolve_config

    host = load_plugins()
    plugin, flags = flags_for(name, model, data)
    config, steps = resolve_config(host, [plugin], flags=flags)
    return estimate_run(config, steps[0], host)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGS))
    parser.add_argument("--worker")
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.data, args.out)))
        return
    from real_shapes import build_model, make_data
    from timing import run_worker_process

    tmp = Path(tempfile.mkdtemp(prefix="molting-estimate-"))
    build_model(tmp / "model")
    data = make_data(tmp, tmp / "model")
    print(f"{'configuration':<30}{'estimate GB':>12}{'measured GB':>13}{'ratio':>8}   parts (GB)")
    for name in args.only or CONFIGS:
        kind = CONFIGS[name][0]
        with tempfile.TemporaryDirectory() as out:
            measured = run_worker_process(__file__, name, ["--worker", name, "--model", str(tmp / "model"),
                                                           "--data", str(data[kind]), "--out", out])["peak_rss"]
        guess = estimated(name, tmp / "model", data[kind])
        parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in guess.parts.items() if v)
        print(f"{name:<30}{guess.total / 1e9:>12.2f}{measured / 1e9:>13.2f}{guess.total / measured:>8.2f}   {parts}",
              flush=True)


if __name__ == "__main__":
    main()
