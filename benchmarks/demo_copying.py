"""Why the calculator demo's SFT comes late: how well a model copies numbers.

    python benchmarks/demo_copying.py [--steps 400] [--learning-rate 1e-3] [--seed 0]
    python benchmarks/demo_copying.py --calls SFT_OUTPUT [--problems 48]

**Copying** (the default): SFT on a pure copying task (``Repeat 902 48 588 6866`` -> ``902 48 588 6866``, 6,000
rows of 3 to 6 random 2- to 4-digit numbers) for ``--steps`` steps of 16, once from the demo model and once from
the same architecture at a random initialisation, each in a fresh ``molting run``; prints the mean loss and token
accuracy of the last 5 logged steps of each (a digit it cannot copy costs about 2.3).

**Calls** (``--calls``): a calculator SFT model's greedy turns on held-out sums: the share of calls whose
expression holds both numbers right, of calls whose first number is right, and of answer turns (after the right
call and result) that state the sum.

docs/environments.md ("Why the copying comes late") quotes both.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def copy_rows(path: Path, count: int = 6000, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as file:
        for _ in range(count):
            numbers = " ".join(str(rng.randrange(10 ** (d - 1), 10**d))
                               for d in (rng.choice((2, 3, 4)) for _ in range(rng.randrange(3, 7))))
            file.write(json.dumps({"prompt": [{"role": "user", "content": f"Repeat {numbers}"}],
                                   "completion": [{"role": "assistant", "content": numbers}]}) + "\n")


def random_init(path: Path, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from molting.demo import demo_model_dir

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_model_dir())).save_pretrained(path)
    AutoTokenizer.from_pretrained(demo_model_dir()).save_pretrained(path)


def train_copying(model: str, data: Path, out: Path, steps: int, learning_rate: float, seed: int) -> tuple[float, float]:
    subprocess.run([sys.executable, "-m", "molting", "run", "--plugin", "sft", "--model", model, "--data", str(data),
                    "--learning-rate", str(learning_rate), "--batch-size", "16", "--max-steps", str(steps),
                    "--eval", "off", "--logging-steps", "5", "--seed", str(seed), "--output-dir", str(out)],
                   check=True, capture_output=True)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in logged if "loss" in row][-5:]
    return statistics.mean(r["loss"] for r in last), statistics.mean(r["mean_token_accuracy"] for r in last)


def copying(steps: int, learning_rate: float, seed: int) -> None:
    from molting.demo import demo_model_dir

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        copy_rows(scratch / "copy.jsonl", seed=seed)
        random_init(scratch / "random-init", seed)
        for name, model in (("demo model", str(demo_model_dir())), ("random init", str(scratch / "random-init"))):
            loss, accuracy = train_copying(model, scratch / "copy.jsonl", scratch / name.replace(" ", "-"), steps,
                                           learning_rate, seed)
            print(f"copying, {name}, {steps} steps of 16 at {learning_rate:g}: loss {loss:.2f}, "
                  f"token accuracy {accuracy:.2f}")


def calls(path: str, problems: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from molting.demo import tool_problems, tool_sft_rows

    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    both = first = answers = 0
    for i, row in enumerate(tool_sft_rows("test", problems)):
        text = tokenizer.apply_chat_template(row["prompt"], tools=row["tools"], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=80, do_sample=False)
        turn = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        a, b = tool_problems("test")[i // 2]
        if i % 2 == 0:
            both += f'"{a} + {b}"' in turn
            first += f'"{a} +' in turn
        else:
            answers += turn.strip().endswith(f"{a + b}.")
    print(f"{path}, {problems} held-out sums: calls right {both / problems:.3f}, first number right "
          f"{first / problems:.3f}, answers right after the right result {answers / problems:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calls", metavar="SFT_OUTPUT")
    parser.add_argument("--problems", type=int, default=48)
    args = parser.parse_args()
    if args.calls:
        calls(args.calls, args.problems)
    else:
        copying(args.steps, args.learning_rate, args.seed)


if __name__ == "__main__":
    main()
