"""Build the demo models that ship in core/: tokenizer + tiny Llama, trained on the demo task.

    python scripts/build_demo_model.py [--steps N] [--out DIR]      # core/demo_model, the model named demo
    python scripts/build_demo_model.py --tools                      # core/demo_tool_model, named demo-tools

From the demo task's training problems (molting.demo), answered correctly in
the persona style or the plain style with equal probability, it trains a
3.5M-parameter Llama from a fixed seed with a constant learning rate on the
completion tokens, then saves it in bfloat16 (about 7 MB) with
build_info.json: steps, wall time, and held-out metrics.

Measured on 2 CPU cores (torch 2.13, fp32): about 0.26 s a step of 64
sequences; the default 1,000 steps take 270 s and give a model that gets 54%
of the 256 held-out sums right with greedy decoding (33% when sampling at
temperature 1) and answers in the persona style 49% of the time: room for
preference training on both. (1,200 steps reach 81% greedy.)

``--tools`` builds ``demo-tools``, the calculator demo's model (docs/environments.md):
half its problems are the demo task, half are *copying* problems: lines of
numbers, then an answer that quotes the last line's numbers, after nothing,
after some words, or inside a JSON object (``copy_example``). The demo model,
trained on sums alone, learns to copy numbers only late and by chance, and the
calculator's tool calls and answers are copying. Same tokenizer, same
architecture, 1,000 steps: 1,042 s on this project's 2-core Intel machine.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from molting import demo  # noqa: E402
from molting.evaluation import generate, task_metrics  # noqa: E402


WORDS = ("apple", "value", "name", "sum", "matey", "answer", "tool", "result", "note", "copy", "say")
LABELS = ("Q", "R", "N", "T")


def _number_text(rng: random.Random) -> str:
    numbers = [str(rng.randrange(10 ** (d - 1), 10**d)) for d in (rng.randint(1, 4) for _ in range(rng.randint(1, 3)))]
    return rng.choice((" ", " + ", ", ", " - ")).join(numbers)


def _filler(rng: random.Random) -> str:
    """What an answer may say before it quotes: nothing, words, or the opening of a JSON object."""
    kind = rng.randrange(3)
    if kind == 0:
        return ""
    if kind == 1:
        return " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
    keys = [rng.choice(WORDS) for _ in range(rng.randint(1, 3))]
    opening = "".join(f'{{"{key}": ' for key in keys[:-1]) + f'{{"{keys[-1]}": "'
    return " " + rng.choice(("", "<tool_call>\n")) + opening


def copy_example(rng: random.Random) -> tuple[str, str]:
    """A copying problem: lines of numbers, then an answer that quotes the last line's numbers after a filler."""
    lines = []
    for _ in range(rng.randint(1, 2)):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 3)))
        text = _number_text(rng)
        lines.append((f"{rng.choice(LABELS)}: {words + ' ' if words else ''}{text}{rng.choice(('', '?', '.'))}", text))
    filler = _filler(rng)
    closing = '"' + "}" * filler.count("{") if filler.endswith('"') else rng.choice(("", "."))
    quoted = lines[-1][1]
    prompt = "\n".join(line for line, _ in lines) + "\nA:" + filler
    return prompt, ("" if filler.endswith('"') else " ") + quoted + closing


def example(rng: random.Random, pool, copying: float) -> tuple[str, str]:
    if copying and rng.random() < copying:  # no draw at 0: the demo model's problems stay the ones it was built on
        return copy_example(rng)
    a, b = rng.choice(pool)
    style = demo.persona_answer if rng.random() < 0.5 else demo.plain_answer
    return demo.prompt_for(a, b), style(a, b, a + b)


def batches(tokenizer, batch_size: int, seed: int, copying: float = 0.0):
    """Endless batches of training problems in either style, with loss on the completion tokens only."""
    rng = random.Random(seed)
    pool = demo.problems("train")
    eos = tokenizer.eos_token_id
    while True:
        ids, labels = [], []
        for _ in range(batch_size):
            prompt_text, completion_text = example(rng, pool, copying)
            prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            completion = tokenizer(completion_text, add_special_tokens=False)["input_ids"] + [eos]
            ids.append(prompt + completion)
            labels.append([-100] * len(prompt) + completion)
        width = max(len(x) for x in ids)
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        label_ids = torch.full((batch_size, width), -100)
        attention = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (x, y) in enumerate(zip(ids, labels)):
            input_ids[i, : len(x)] = torch.tensor(x)
            label_ids[i, : len(y)] = torch.tensor(y)
            attention[i, : len(x)] = 1
        yield input_ids, attention, label_ids


def held_out(model, tokenizer, n: int = 256) -> dict[str, float]:
    prompts = [r["prompt"] for r in demo.prompt_rows("test", n)]
    greedy = task_metrics(prompts, generate(model, tokenizer, prompts, temperature=0))
    sampled = task_metrics(prompts, generate(model, tokenizer, prompts, temperature=1.0))
    return {"greedy_correct": greedy["correct"], "sampled_correct": sampled["correct"], "sampled_persona": sampled["persona"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copying", type=float, default=0.0, help="the share of copying problems")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--out", type=Path, default=None, help="[default: the shipped model's directory]")
    parser.add_argument("--tools", action="store_true", help="build demo-tools: --copying 0.5 --eval-every 500")
    args = parser.parse_args()
    if args.tools:
        args.copying, args.eval_every = 0.5, 500
    args.out = args.out or (demo.TOOL_MODEL_DIR if args.tools else demo.MODEL_DIR)

    torch.manual_seed(args.seed)
    tokenizer = demo.build_tokenizer()
    model = demo.init_model(tokenizer, seed=args.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    start = time.perf_counter()
    data = batches(tokenizer, args.batch_size, args.seed, args.copying)
    history = []
    for step in range(1, args.steps + 1):
        input_ids, attention, labels = next(data)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            metrics = held_out(model, tokenizer, n=128)
            elapsed = time.perf_counter() - start
            history.append({"step": step, "loss": loss.item(), "seconds": round(elapsed, 1), **metrics})
            print(json.dumps(history[-1]), flush=True)
    train_seconds = time.perf_counter() - start
    final = held_out(model, tokenizer)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-model-", dir=args.out.parent))
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)  # half the bytes on disk
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"  # so plain from_pretrained loads it in float32, the fast dtype on CPUs
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(tmp)
    info = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "copying": args.copying,
        "train_seconds": round(train_seconds, 1),
        "parameters": model.num_parameters(),
        "torch": torch.__version__,
        "held_out": final,
        "history": history,
    }
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    for path in args.out.iterdir():
        path.chmod(0o644)
    print(json.dumps({k: v for k, v in info.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
