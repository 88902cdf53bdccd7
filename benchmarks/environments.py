"""The calculator demo end to end, and where a multi-turn GRPO step's time goes.

    python benchmarks/environments.py [--sft-steps 1500] [--grpo-steps 80] [--seed 0] [--skip-demo] [--breakdown]

**The demo** (examples/calculator/recipe.yaml, run as `molting run --config`): SFT of the built-in `demo-tools`
model on the calculator's tool-use demonstrations (`demo-tool-sft`), then GRPO with the `calculator` environment.
`--sft-steps` sets the SFT's step count, `--grpo-steps` the GRPO's. The models answer the 256 held-out 3- and
4-digit sums greedily, as episodes: the starting model in its head (no tool offered), offered the tool, after the
SFT, after the GRPO. Prints their accuracy (the
environment's reward), tool-call rate, malformed-call rate, tool-error rate and turns side by side, and each
phase's wall time on this machine.

**The breakdown** (`--breakdown`): GRPO steps on 4-turn episodes (an environment that asks the model to go on
until its fourth turn, calling the calculator each time), the step split into sampling (the sampler's calls),
the environment (its episodes' steps, the tool calls among them) and training (the rest of the step: the
log-probs, the loss, the optimizer, and the rollout's own bookkeeping: parsing calls, writing observations as
tokens); medians over the steps.

docs/environments.md quotes both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def evaluate(path: Path, tools: bool = True) -> dict[str, float]:
    """The calculator's held-out figures for ``path`` (greedy episodes; without ``tools``, no tool is offered)."""
    from molting import demo
    from molting.components import Environment
    from molting.discovery import load_plugins
    from molting.environments import EpisodeRunner, RolloutSettings, evaluate_episodes
    from molting.models import load_causal_lm

    host = load_plugins()
    environment = host.get("environment", "calculator")
    if not tools:  # the same sums and reward, answered in the head
        calculator = environment

        def start(row, seed, params):
            episode = calculator.start(row, seed, params)
            episode.tools = []
            return episode

        environment = Environment(name="in-the-head", start=start, params=calculator.params, max_turns=1,
                                  description="The calculator's sums without the tool.")
    runner = EpisodeRunner(environment, environment.params(), host.get("tool_parser", "hermes"),
                           RolloutSettings(max_turns=3, max_new_tokens=96, max_episode_tokens=256))
    model, tokenizer = load_causal_lm(path)
    metrics, _ = evaluate_episodes(model.eval(), tokenizer, runner, demo.tool_prompt_rows("test"))
    return metrics


def recipe_with(scratch: Path, sft_steps: int | None, grpo_steps: int | None) -> Path:
    """examples/calculator/recipe.yaml with other step counts, when given."""
    import yaml

    recipe = yaml.safe_load((ROOT / "examples" / "calculator" / "recipe.yaml").read_text())
    for stage in recipe["stages"]:
        steps = grpo_steps if stage["plugin"] == "grpo" else sft_steps
        if steps is not None:
            stage["max_steps"] = steps
    path = scratch / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def demo_table(sft_steps: int | None, grpo_steps: int | None, seed: int) -> None:
    import yaml

    from molting.environments import EVAL_METRICS
    from molting.models import resolve_model_path

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "calculator"
        recipe = recipe_with(Path(scratch), sft_steps, grpo_steps)
        start = resolve_model_path(yaml.safe_load(recipe.read_text()).get("model"))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "molting", "run", "--config", str(recipe), "--output-dir", str(out),
                        "--seed", str(seed), "--eval", "off"], check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        phases = {p.name: json.loads((p / "molting_run.json").read_text()) for p in sorted(out.iterdir())
                  if (p / "molting_run.json").exists()}
        columns = {"in its head": evaluate(start, tools=False), "tool offered": evaluate(start),
                   "after SFT": evaluate(out / "1-sft"), "after GRPO": evaluate(out / "2-grpo")}
    print(f"calculator demo, seed {seed}: {wall:.0f} s in all on this machine; "
          + ", ".join(f"{name} {record['metrics'].get('train_runtime', 0):.0f} s" for name, record in phases.items()))
    print("| held-out (256 sums, greedy) | " + " | ".join(columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for name in EVAL_METRICS:
        print(f"| {name} | " + " | ".join(f"{c[name]:.3f}" for c in columns.values()) + " |")


# --------------------------------------------------------------------------- the breakdown


def breakdown(steps: int, seed: int, model: str | None = None) -> None:
    import molting
    from molting import demo
    from molting.components import Environment, Sampler
    from molting.discovery import load_plugins
    from molting.environments import ToolEpisode, Turn
    from molting.pipeline import run
    from molting.resolve import resolve_config
    from molting.sampling import hf_sample

    clock = {"sampling": 0.0, "environment": 0.0}

    def timed_sample(request):
        started = time.perf_counter()
        try:
            return hf_sample(request)
        finally:
            clock["sampling"] += time.perf_counter() - started

    class FourTurns(ToolEpisode):
        """Calls the calculator or not, the user asks to go on until the fourth turn."""

        async def step(self, turn):
            started = time.perf_counter()
            try:
                if turn.index == 3:
                    return Turn(reward=float(demo.tool_answer_correct(self.answer, turn.content)), done=True)
                answer = await ToolEpisode.step(self, turn)
                said = list(answer.observation) or [{"role": "user", "content": "Check it again."}]
                return Turn(said, tool_calls=answer.tool_calls, tool_errors=answer.tool_errors)
            finally:
                clock["environment"] += time.perf_counter() - started

    def start(row, seed, params):
        episode = FourTurns(row["prompt"], [demo.calculator])
        episode.answer = row["answer"]
        return episode

    class Plugin:
        @molting.hookimpl
        def molting_register_samplers(self, register):
            register(Sampler(name="timed", sample=timed_sample, description="hf, timed."))

        @molting.hookimpl
        def molting_register_environments(self, register):
            register(Environment(name="four-turns", start=start, max_turns=4, default_data="demo-tool-prompts",
                                 description="The calculator's sums over four turns."))

    host = load_plugins()
    host.register(Plugin(), "benchmark")
    per_step: list[dict[str, float]] = []
    last = dict(clock, wall=time.perf_counter())

    class StepTimer:
        @molting.hookimpl
        def molting_on_log(self, metrics, step):
            now = time.perf_counter()
            per_step.append({"step": now - last["wall"], "sampling": clock["sampling"] - last["sampling"],
                             "environment": clock["environment"] - last["environment"],
                             "turns": metrics.get("env/turns", 0)})
            last.update(clock, wall=now)

    host.register(StepTimer(), "step-timer")
    with tempfile.TemporaryDirectory() as scratch:
        config, plan = resolve_config(host, ["grpo"], flags={
            "output_dir": scratch, "eval": "off", "seed": seed, "env": "four-turns", "sampler": "timed",
            "max_steps": steps, "logging_steps": 1, "batch_size": 16, "num_generations": 8, "max_new_tokens": 96,
            "max_episode_tokens": 448, "learning_rate": 5e-5, "model": model or str(demo.demo_model_dir())})
        last["wall"] = time.perf_counter()
        run(config, plan, host)
    rows = per_step[1:] or per_step  # the first step also builds the optimizer
    medians = {k: statistics.median(r[k] for r in rows) for k in ("step", "sampling", "environment", "turns")}
    training = medians["step"] - medians["sampling"] - medians["environment"]
    print(f"GRPO on 4-turn episodes (16 episodes a step, up to 96 tokens a turn), median over {len(rows)} steps: "
          f"{medians['step']:.2f} s a step = sampling {medians['sampling']:.2f} s + environment "
          f"{medians['environment']:.3f} s + training {training:.2f} s; {medians['turns']:.1f} turns an episode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=None, help="the recipe's when not given")
    parser.add_argument("--grpo-steps", type=int, default=None, help="the recipe's when not given")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--breakdown-steps", type=int, default=6)
    parser.add_argument("--breakdown-model", help="a model that calls the calculator (an SFT output of the demo) "
                                                  "[default: the demo model, which does not]")
    args = parser.parse_args()
    if not args.skip_demo:
        demo_table(args.sft_steps, args.grpo_steps, args.seed)
    if args.breakdown:
        breakdown(args.breakdown_steps, args.seed, args.breakdown_model)


if __name__ == "__main__":
    main()
