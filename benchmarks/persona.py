"""The persona workflow's two hypotheses, measured at demo scale, several seeds.

The person is the demo's ``captain`` (``demo-persona-logs``): ``sam`` asks sums,
the captain answers each one correctly, always in the persona style ("Arr! 12
plus 30 be 42, matey."). The demo model answers in that style about half the
time. The held-out figure is **persona consistency**: the share of answers in
the captain's style, sampled at temperature 1 (and greedy) for the held-out
conversations' questions (the demo test problems, with their conversation so
far), and the share with the right sum.

Arms, per seed, from the demo model:

* ``sft``: SFT on the captain's turns for ``--sft-steps + --dpo-steps`` steps
  (the same number of optimizer steps and batch size as the others);
* ``sft+dpo (judged)``: SFT for ``--sft-steps``, then ``sample-pairs`` (4 answers
  per prompt from the SFT model, ranked by the ``openai-pairwise`` judge over
  HTTP, reference-guided: "which reply is closer to how this person
  answered", the captain's real reply as the reference), then DPO for
  ``--dpo-steps`` on those pairs;
* ``sft+dpo (off-policy)``: the same SFT, then DPO for ``--dpo-steps`` on
  off-policy pairs of the same prompts: the captain's real reply chosen, a
  generic reply ("The answer is 42.") rejected.

H012: persona consistency of ``sft+dpo (judged)`` against ``sft``. H013: ``sft+dpo
(judged)`` against ``sft+dpo (off-policy)``.

The judge must be able to judge, so molting trains one: the demo model,
fine-tuned (``--plugin sft``) on comparisons of a reference reply with two
candidates of the kinds a policy writes here (the captain's style or the
plain one, the right sum or a wrong one, cut short), labelled by which is
closer to the reference: same style first, then same sum. Its accuracy on
held-out comparisons is printed. It is served by ``molting serve`` (a
subprocess) and called through the ``openai-pairwise`` judge, as a user
would call a served judge.

    python benchmarks/persona.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from molting import demo
from molting.serve import spawn

# a short judging prompt: the demo model's context is 512 tokens of a small vocabulary
TEMPLATE = "{question}\nRef: {reference}\nA: {answer_a}\nB: {answer_b}\nCloser?"
JUDGE_SETTINGS = {"template": TEMPLATE, "reference_column": "completion", "max_tokens": 3, "concurrency": 16}


# --------------------------------------------------------------------------- data


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def candidates(a: int, b: int, rng: random.Random) -> list[tuple[str, float]]:
    """Replies of the kinds a policy writes here, each with its closeness to the captain's: style, then sum."""
    total, wrong = a + b, a + b + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11])
    persona, plain = demo.persona_answer, demo.plain_answer
    kinds = [(persona(a, b, total), 3.0), (persona(a, b, wrong), 2.0), (plain(a, b, total), 1.0),
             (plain(a, b, wrong), 0.5)]
    cut, score = rng.choice(kinds[:2])
    kinds.append((cut[: rng.randint(6, len(cut) - 4)], score - 1.5))  # cut short: closer than plain, not than whole
    return [(text.strip(), value) for text, value in kinds]


def judge_rows(split: str, count: int, seed: int) -> list[dict[str, Any]]:
    """Chat rows teaching the judge: the filled template as the user's message, "A" or "B" as the answer."""
    rng = random.Random(f"persona-judge-{split}-{seed}")
    rows = []
    for _ in range(count):
        a, b = rng.choice(demo.problems(split))
        pool = candidates(a, b, rng)
        (first, s1), (second, s2) = rng.sample([c for c in pool], 2)
        while s1 == s2:
            (first, s1), (second, s2) = rng.sample(pool, 2)
        question = f"What is {a} + {b}?"
        if rng.random() < 0.5:  # later turns: the conversation so far comes first, as the stage sends it
            c, d = rng.choice(demo.problems(split))
            question = f"What is {c} + {d}?\n{demo.persona_answer(c, d, c + d).strip()}\n{question}"
        text = TEMPLATE.format(question=question, reference=demo.persona_answer(a, b, a + b).strip(),
                               answer_a=first, answer_b=second)
        rows.append({"prompt": [{"role": "user", "content": text}],
                     "completion": [{"role": "assistant", "content": "A" if s1 > s2 else "B"}]})
    return rows


def off_policy_pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The captain's real reply chosen against a generic one, for each persona row."""
    pairs = []
    for row in rows:
        a, b = map(int, demo.PROMPT.search(row["prompt"][-1]["content"]).groups())
        pairs.append({"prompt": row["prompt"], "chosen": row["completion"],
                      "rejected": [{"role": "assistant", "content": demo.plain_answer(a, b, a + b).strip()}]})
    return pairs


# --------------------------------------------------------------------------- running molting


def run(plugin: str, output: Path, **flags: Any) -> dict[str, Any]:
    from molting.discovery import load_plugins
    from molting.pipeline import run as run_steps
    from molting.resolve import resolve_config

    host = load_plugins()
    settings = {"output_dir": str(output), "eval": "off", "batch_size": 8, "logging_steps": 1000, **flags}
    config, steps = resolve_config(host, [plugin], flags=settings)
    return run_steps(config, steps, host)[-1]


def consistency(model_dir: Path, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Persona and correct rates of sampled (temperature 1, seed 0) and greedy answers to the held-out turns."""
    from molting.evaluation import generate
    from molting.models import load_causal_lm

    model, tokenizer = load_causal_lm(model_dir)
    prompts = [row["prompt"] for row in rows]
    questions = [demo.prompt_for(*map(int, demo.PROMPT.search(p[-1]["content"]).groups())) for p in prompts]
    result = {}
    for name, temperature in (("sampled", 1.0), ("greedy", 0.0)):
        texts = generate(model, tokenizer, prompts, max_new_tokens=24, temperature=temperature, seed=0)
        graded = [demo.grade(q, " " + t.strip()) for q, t in zip(questions, texts)]
        result[f"persona_{name}"] = sum(g["persona"] for g in graded) / len(graded)
        result[f"correct_{name}"] = sum(g["correct"] for g in graded) / len(graded)
    return result


# --------------------------------------------------------------------------- the judge


def train_judge(work: Path, rows: int, epochs: float) -> Path:
    data = write_jsonl(work / "judge-train.jsonl", judge_rows("train", rows, 0))
    run("sft", work / "judge", data=str(data), learning_rate=5e-4, epochs=epochs, batch_size=16, seed=0)
    return work / "judge"


def judge_accuracy(url: str, count: int = 200) -> tuple[float, float]:
    """The served judge on held-out comparisons (test problems), in both orders, as the run asks it: the share it
    gets right, and the share it leaves undecided (the orders disagree)."""
    from molting.discovery import load_plugins
    from molting.judging import JudgeSpec, Scorer

    judge = load_plugins().get("judge", "openai-pairwise")
    spec = JudgeSpec("openai-pairwise", judge, 1.0, judge.params(base_url=url, model="judge", **JUDGE_SETTINGS))
    rng = random.Random("persona-judge-eval")
    prompts, pairs, references, truth = [], [], [], []
    for _ in range(count):
        a, b = rng.choice(demo.problems("test"))
        (first, s1), (second, s2) = rng.sample([c for c in candidates(a, b, rng)], 2)
        if s1 == s2:
            continue
        prompts.append([{"role": "user", "content": f"What is {a} + {b}?"}])
        pairs.append((first, second))
        references.append([{"role": "assistant", "content": demo.persona_answer(a, b, a + b).strip()}])
        truth.append(0 if s1 > s2 else 1)
    verdicts = Scorer([spec], pairwise=True, on_error="zero").score(spec, prompts, pairs, {"completion": references})
    return sum(v == t for v, t in zip(verdicts, truth)) / len(truth), sum(v == -1 for v in verdicts) / len(truth)


# --------------------------------------------------------------------------- the arms


def arms(work: Path, seed: int, url: str, args: argparse.Namespace, train_log: Path, pair_log: Path,
         held_out: list[dict[str, Any]], pair_rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    common = {"seed": seed, "learning_rate": args.learning_rate}
    persona = {"data": str(train_log), "persona_role": demo.PERSON}
    base = work / f"s{seed}-sft"
    run("sft", base, max_steps=args.sft_steps, **persona, **common)
    run("sft", work / f"s{seed}-sft-long", max_steps=args.sft_steps + args.dpo_steps, **persona, **common)
    judged = {"judges": {"openai-pairwise": 1.0}, "judge_on_error": "skip",
              "judge_args": {"openai-pairwise": {"base_url": url, "model": "judge", **JUDGE_SETTINGS}}}
    run("sample-pairs", work / f"s{seed}-pairs", model=str(base), data=str(pair_log), persona_role=demo.PERSON,
        num_samples=4, max_new_tokens=24, seed=seed, **judged)
    dpo = {"max_steps": args.dpo_steps, "beta": 0.1, **common}
    run("dpo", work / f"s{seed}-dpo-judged", model=str(base), data=str(work / f"s{seed}-pairs" / "data.jsonl"), **dpo)
    off = write_jsonl(work / f"s{seed}-offpolicy.jsonl", off_policy_pairs(pair_rows))
    run("dpo", work / f"s{seed}-dpo-off", model=str(base), data=str(off), **dpo)
    models = {"demo model": None, "sft (short)": base, "sft": work / f"s{seed}-sft-long",
              "sft+dpo (judged)": work / f"s{seed}-dpo-judged", "sft+dpo (off-policy)": work / f"s{seed}-dpo-off"}
    return {name: consistency(path or demo.demo_model_dir(), held_out) for name, path in models.items()}


def report(results: list[dict[str, dict[str, float]]], seeds: list[int]) -> None:
    metrics = ("persona_sampled", "persona_greedy", "correct_sampled", "correct_greedy")
    print(f"\nheld-out persona consistency, seeds {seeds}: median (min-max)")
    print(f"{'arm':<22}" + "".join(f"{m:>22}" for m in metrics))
    for arm in results[0]:
        cells = []
        for metric in metrics:
            values = [r[arm][metric] for r in results]
            cells.append(f"{statistics.median(values):.3f} ({min(values):.2f}-{max(values):.2f})")
        print(f"{arm:<22}" + "".join(f"{c:>22}" for c in cells))
    for label, ours, theirs in (("H012", "sft+dpo (judged)", "sft"), ("H013", "sft+dpo (judged)", "sft+dpo (off-policy)")):
        diffs = [r[ours]["persona_sampled"] - r[theirs]["persona_sampled"] for r in results]
        print(f"{label}: {ours} - {theirs}, sampled persona rate: median {statistics.median(diffs):+.3f}, "
              f"per seed {', '.join(f'{d:+.3f}' for d in diffs)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sft-steps", type=int, default=16)
    parser.add_argument("--dpo-steps", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--judge-rows", type=int, default=6000)
    parser.add_argument("--judge-epochs", type=float, default=3.0)
    parser.add_argument("--pair-conversations", type=int, default=48)
    parser.add_argument("--held-out", type=int, default=128)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--judge", type=Path, default=None, help="A judge this script trained before (WORK/judge).")
    args = parser.parse_args()
    from molting.conversations import conversations, persona_rows

    work = args.work or Path(tempfile.mkdtemp(prefix="molting-persona-"))
    work.mkdir(parents=True, exist_ok=True)
    train_log = write_jsonl(work / "logs-train.jsonl", demo.persona_logs("train"))
    pair_logs = demo.persona_logs("train")[: args.pair_conversations]
    pair_log = write_jsonl(work / "logs-pairs.jsonl", pair_logs)
    pair_rows = persona_rows(conversations(pair_logs, "pairs"), demo.PERSON, "pairs")
    held_out = persona_rows(conversations(demo.persona_logs("test"), "test"), demo.PERSON, "test")[: args.held_out]
    started = time.time()
    judge = args.judge or train_judge(work, args.judge_rows, args.judge_epochs)
    process, url = spawn(str(judge), "--model-name", "judge", "--max-batch-size", "32")
    try:
        right, undecided = judge_accuracy(url)
        print(f"judge: trained in {time.time() - started:.0f} s; on held-out comparisons {right:.3f} right (both "
              f"orders agreeing), {undecided:.3f} undecided")
        results = []
        for seed in args.seeds:
            began = time.time()
            results.append(arms(work, seed, url, args, train_log, pair_log, held_out, pair_rows))
            print(f"seed {seed}: {time.time() - began:.0f} s " + json.dumps(results[-1]))
    finally:
        process.terminate()
        process.wait(timeout=60)
    report(results, args.seeds)
    print(f"work directory: {work}")


if __name__ == "__main__":
    main()
